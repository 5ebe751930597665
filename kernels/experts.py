"""Grouped expert FFN: only each token's chosen expert is computed.

Rows are sorted by expert and every active expert's rows go through the gate/up and the down
projection of that expert, instead of the reference's dense E x tokens computation. Each
projection is one grouped matmul over all experts (ExpertBank.mm_grouped: torch._grouped_mm
on dense banks, so no Python-level loop per expert) and the SwiGLU runs once on every row.
Legend:
  x [N, H]            expert inputs (already scaled by the gate score)
  expert_ids [N]      local expert index of each row, 0 <= id < E
  counts [E]          rows per expert, in expert order (rows sorted by expert)
  w13                 gate (first I outputs) and up (last I outputs), concatenated: a tensor
                      [E, H, 2I] in the HF checkpoint orientation ([in, out], used as x @ W) or
                      an expert bank (kernels.quant) holding them quantized
  w2                  down projection: [E, I, H] or a bank
"""
import torch
import torch.nn.functional as F

from kernels.quant import DenseBank


def grouped_expert_ffn(x: torch.Tensor, expert_ids: torch.Tensor, w13, w2, sorted_by_expert: bool = False
                       ) -> torch.Tensor:
    """sorted_by_expert: the caller has checked that expert_ids never decreases (the router sends
    each worker its rows grouped by expert), so no sort and no scatter back are needed."""
    if x.shape[0] == 0:
        return torch.empty_like(x)
    w13 = DenseBank(w13, out_major=False) if isinstance(w13, torch.Tensor) else w13
    w2 = DenseBank(w2, out_major=False) if isinstance(w2, torch.Tensor) else w2
    counts = torch.bincount(expert_ids, minlength=w13.num_experts)
    if sorted_by_expert or x.shape[0] == 1:
        return _swiglu_experts(x, counts, w13, w2)
    order = torch.argsort(expert_ids, stable=True)
    out = torch.empty_like(x)
    out[order] = _swiglu_experts(x[order], counts, w13, w2)
    return out


def _swiglu_experts(x_sorted: torch.Tensor, counts: torch.Tensor, w13, w2) -> torch.Tensor:
    gate, up = w13.mm_grouped(x_sorted, counts).chunk(2, dim=-1)  # [N, I] each
    return w2.mm_grouped(F.silu(gate) * up, counts)
