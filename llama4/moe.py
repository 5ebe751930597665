"""The MoEBackend seam: how the layer stack gets a MoE layer's routed-expert output.

The model calls `submit(layer, x)` before computing the shared expert and `result()` after,
so a remote backend overlaps its RPC with the shared expert (and, with micro-batches, with
the other micro-batches' layers); several submits may be pending at once. The result carries the routed
output together with where each row went (its expert and the worker that ran it), so the
route trace travels with the data instead of beside it. LocalMoE runs routing and the
grouped expert FFN in this process with the same kernels the expert workers use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels import grouped_expert_ffn, route_top1

LOCAL_WORKER = -1  # the worker id of rows computed in this process


class RowsRefused(RuntimeError):
    """A MoE backend refused an exchange for the values of its rows (an expert output that
    overflowed, a non-finite row): the fault of the sequences those rows came from, and
    deterministic, so the same rows are refused again. Any other failure of a step is the
    cluster's (unavailable, timed out, a malformed answer) and fails the whole step, retryable."""


@dataclass
class Route:
    """Where the rows of one MoE layer went: expert_ids [N], workers [N] (int64, CPU)."""

    expert_ids: torch.Tensor
    workers: torch.Tensor


@dataclass
class Routed:
    y: torch.Tensor  # [N, H] routed output in token order
    route: Route


class PendingRouted(Protocol):
    def result(self) -> Routed:
        """The routed output of the submitted rows, in token order."""


class MoEBackend(Protocol):
    is_remote: bool  # the routed experts run in other processes: other work can overlap them

    def submit(self, layer: int, x: torch.Tensor) -> PendingRouted:
        """Start the routed experts of MoE layer `layer` on normalised inputs x [N, H]."""


class _Deferred:
    def __init__(self, fn):
        self._fn = fn

    def result(self) -> Routed:
        return self._fn()


class LocalMoE:
    """Every gate and routed expert in this process (the monolithic reference)."""

    is_remote = False

    def __init__(self, gates: dict[int, torch.Tensor], experts: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.gates = gates  # layer -> [E, H]
        self.experts = experts  # layer -> (w13, w2): expert banks (kernels.quant) or [E, H, 2I], [E, I, H]
        self.tokens_per_expert = {l: torch.zeros(g.shape[0], dtype=torch.long) for l, g in gates.items()}

    def submit(self, layer: int, x: torch.Tensor) -> PendingRouted:
        return _Deferred(lambda: self._run(layer, x))

    def _run(self, layer: int, x: torch.Tensor) -> Routed:
        expert_ids, scaled = route_top1(x, self.gates[layer])
        ids = expert_ids.cpu()
        self.tokens_per_expert[layer] += torch.bincount(ids, minlength=self.gates[layer].shape[0])
        w13, w2 = self.experts[layer]
        y = grouped_expert_ffn(scaled, expert_ids, w13, w2)
        if not torch.isfinite(y).all():  # refused as an expert worker refuses it: the monolithic model is the reference
            raise RowsRefused(f"expert output overflowed for layer {layer}")
        return Routed(y, Route(ids, torch.full_like(ids, LOCAL_WORKER)))
