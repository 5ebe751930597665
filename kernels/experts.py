"""Grouped expert FFN: only each token's chosen expert is computed.

Rows are sorted by expert and each active expert runs one matmul pair over its rows,
instead of the reference's dense E x tokens computation. Weights keep the HF checkpoint
orientation ([in, out], used as x @ W). Legend:
  x [N, H]            expert inputs (already scaled by the gate score)
  expert_ids [N]      local expert index of each row, 0 <= id < E
  w13 [E, H, 2I]      gate (first I columns) and up (last I columns), concatenated
  w2 [E, I, H]        down projection
"""
import torch
import torch.nn.functional as F


def grouped_expert_ffn(x: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.empty_like(x)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=w13.shape[0]).tolist()
    x_sorted = x[order]
    out_sorted = torch.empty_like(x_sorted)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = x_sorted[start : start + count]
        gate, up = (rows @ w13[expert]).chunk(2, dim=-1)
        out_sorted[start : start + count] = (F.silu(gate) * up) @ w2[expert]
        start += count
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out
