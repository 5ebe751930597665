"""Grouped expert FFN: only each token's chosen expert is computed.

Rows are sorted by expert and each active expert runs one matmul pair over its rows,
instead of the reference's dense E x tokens computation. Legend:
  x [N, H]            expert inputs (already scaled by the gate score)
  expert_ids [N]      local expert index of each row, 0 <= id < E
  w13                 gate (first I outputs) and up (last I outputs), concatenated: a tensor
                      [E, H, 2I] in the HF checkpoint orientation ([in, out], used as x @ W) or
                      an expert bank (kernels.quant) holding them quantized
  w2                  down projection: [E, I, H] or a bank
"""
import torch
import torch.nn.functional as F

from kernels.quant import DenseBank


def grouped_expert_ffn(x: torch.Tensor, expert_ids: torch.Tensor, w13, w2) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.empty_like(x)
    w13 = DenseBank(w13) if isinstance(w13, torch.Tensor) else w13
    w2 = DenseBank(w2) if isinstance(w2, torch.Tensor) else w2
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids).tolist()
    x_sorted = x[order]
    out_sorted = torch.empty_like(x_sorted)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = x_sorted[start : start + count]
        gate, up = w13.mm(expert, rows).chunk(2, dim=-1)
        out_sorted[start : start + count] = w2.mm(expert, F.silu(gate) * up)
        start += count
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out
