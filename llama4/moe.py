"""The MoEBackend seam: how the layer stack gets a MoE layer's routed-expert output.

The model calls `submit(layer, x)` before computing the shared expert and `result()` after,
so a remote backend overlaps its RPC with the shared expert. LocalMoE runs routing and the
grouped expert FFN in this process with the same kernels the expert workers use.
"""
from __future__ import annotations

from typing import Protocol

import torch

from kernels import grouped_expert_ffn, route_top1


class PendingRouted(Protocol):
    def result(self) -> torch.Tensor:
        """Routed output [N, H] in token order."""


class MoEBackend(Protocol):
    # layer -> (expert id [N], worker [N]) of the last forward pass: where each row went.
    last_routes: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def submit(self, layer: int, x: torch.Tensor) -> PendingRouted:
        """Start the routed experts of MoE layer `layer` on normalised inputs x [N, H]."""


class _Deferred:
    def __init__(self, fn):
        self._fn = fn

    def result(self) -> torch.Tensor:
        return self._fn()


class LocalMoE:
    """Every router and routed expert in this process (the monolithic reference)."""

    def __init__(self, routers: dict[int, torch.Tensor], experts: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.routers = routers  # layer -> [E, H]
        self.experts = experts  # layer -> (w13 [E, H, 2I], w2 [E, I, H])
        self.tokens_per_expert = {l: torch.zeros(r.shape[0], dtype=torch.long) for l, r in routers.items()}
        self.last_routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def submit(self, layer: int, x: torch.Tensor) -> PendingRouted:
        return _Deferred(lambda: self._run(layer, x))

    def _run(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        expert_ids, scaled = route_top1(x, self.routers[layer])
        self.tokens_per_expert[layer] += torch.bincount(expert_ids.cpu(), minlength=self.routers[layer].shape[0])
        self.last_routes[layer] = (expert_ids.cpu(), torch.full_like(expert_ids.cpu(), -1))
        w13, w2 = self.experts[layer]
        return grouped_expert_ffn(scaled, expert_ids, w13, w2)
