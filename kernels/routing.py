"""Llama 4 top-1 sigmoid routing.

Legend: x [N, H], gate [E, H] (the MoE layer's gate weights, HF's `feed_forward.router`).
The score multiplies the expert's INPUT (the reference's order); sigmoid is taken in fp32
over the chosen logit only, with no renormalisation.
"""
import torch
import torch.nn.functional as F


def route_top1(x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert_ids [N] int64, scaled inputs [N, H] = sigmoid(r[e*]) * x)."""
    logits = F.linear(x, gate)  # [N, E]
    top_logit, expert_ids = logits.max(dim=-1)
    scores = torch.sigmoid(top_logit.float()).to(x.dtype)
    return expert_ids, x * scores[:, None]
