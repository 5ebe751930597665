"""SwiGLU feed-forward with nn.Linear-oriented weights.

Legend: x [N, H], gate/up [I, H], down [H, I].
"""
import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
