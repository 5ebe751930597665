"""The data path's dispatch: gate a MoE layer's rows, send each worker its block, combine.

One Dispatcher per process that sends rows to expert workers: the router's (dispatch: router),
or an attention service's own (dispatch: direct). It runs on one asyncio loop. Per exchange:
route every row with the layer's gate (score on the input), group rows by the worker that holds
their expert (placement.choice()), send one RunExperts exchange per worker that got rows, and
combine the answers back into token order. A worker that answers UNAVAILABLE (killed,
restarting) is marked down: its rows go at once to another replica, or, without one, wait for
the worker to publish its new address (placement.refresh()); RunExperts is idempotent, so
retries run until the caller's deadline. A worker that stops answering (frozen, wedged: its
exchange overdue past the bound placement keeps for it) is routed around the same way: the
overdue exchange is given up on its stream (its late answer is dropped) and its rows go to
replicas; without a replica for every one of its rows it is awaited until the deadline.

Coalescer (the router's M:N fan-in): exchanges for the same layer that are at the dispatcher at
the same moment (read in the same turn of the loop, from any stream) are gated and sent as one
exchange per worker, and each gets its own rows back. It never waits for more work than is
already there: no timer, one turn of the loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import torch

from herdpb import expert_pb2
from kernels import route_top1
from plumbing.grpc_server import RpcFailure
from plumbing.tensor_codec import WireError, read_tensor, write_tensor

log = logging.getLogger("herd.router")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class _Call:
    worker: object
    exchange: object
    start: int
    count: int
    sent: float


async def _answered_or_overdue(call: _Call, deadline: float) -> bool:
    """Wait for one exchange until it is answered (True) or overdue (False: its worker answered
    nothing, neither it nor a probe, for the worker's overdue bound); True at the deadline too."""
    while True:
        now = time.monotonic()
        wait_s = min(deadline - now, call.worker.overdue_in(call.sent, now))
        if wait_s <= 0:
            return now >= deadline or call.exchange.done()
        if await call.exchange.wait(wait_s):
            return True


class Dispatcher:
    """gates: layer -> [E, H]; placement: router_svc.placement.Placement (or one the router pushes)."""

    def __init__(self, gates: dict[int, torch.Tensor], placement, hidden: int, dtype: torch.dtype, metrics=None):
        self.gates, self.placement, self.hidden, self.dtype = gates, placement, hidden, dtype
        self.num_experts = placement.num_experts
        self.metrics = metrics  # RouterMetrics-like: rpc_seconds (labelled by worker), rerouted_rows; or None
        self.tokens_per_expert = {l: torch.zeros(self.num_experts, dtype=torch.long) for l in gates}
        self.routes = self.retries = self.worker_rpcs = self.hedges = self.rerouted = 0
        self._rpc_children: dict[int, object] = {}

    async def route(self, layer: int, x: torch.Tensor, deadline: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """(y [N, H], expert of each row [N], worker of each row [N]) for rows x of MoE layer `layer`."""
        with torch.inference_mode():
            expert_ids, scaled = route_top1(x, self.gates[layer])
        self.tokens_per_expert[layer] += torch.bincount(expert_ids, minlength=self.num_experts)
        try:
            y, served_by = await self._dispatch(layer, scaled, expert_ids, deadline)
        except grpc.RpcError as exc:
            raise RpcFailure(exc.code(), f"expert worker call failed: {exc.details()}") from None
        return y, expert_ids, served_by

    async def _dispatch(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                        deadline: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every row on a worker holding its expert: (y [N, H] in token order, worker of each row [N]).

        Rows go out sorted by (worker, expert): each worker gets one contiguous block of them, its
        rows contiguous per expert (so it need not sort), and its answer is decoded straight into
        the same block of the sorted output."""
        y = served_by = None  # y is allocated only when the rows went out reordered
        todo = None  # the rows (indices into x) still to run; None: every row
        placement = self.placement
        while True:
            ids = expert_ids if todo is None else expert_ids[todo]
            choice, complete = placement.choice()
            owner = choice[ids]
            if not complete and (owner < 0).any():  # every holder is down: wait for one to (re)publish
                if time.monotonic() >= deadline:
                    raise RpcFailure(grpc.StatusCode.UNAVAILABLE,
                                     f"no usable worker holds experts {ids[owner < 0].unique().tolist()}")
                await asyncio.sleep(0.2)
                await placement.refresh_async()
                continue
            if todo is None:
                served_by = owner
            else:
                served_by[todo] = owner
            rows = todo  # sorted position -> row of x; None: the identity
            if ids.shape[0] > 1:
                order = torch.argsort(owner * self.num_experts + ids, stable=True)
                rows = order if todo is None else todo[order]
                ids, owner = ids[order], owner[order]
            x_sorted = x if rows is None else x[rows]
            y_sorted = torch.empty_like(x_sorted)
            if ids.shape[0] == 1:
                workers, counts = [int(owner[0])], [1]
            else:
                workers, counts = torch.unique_consecutive(owner, return_counts=True)
                workers, counts = workers.tolist(), counts.tolist()
            ids_list = ids.tolist()
            calls, start = [], 0
            for w, count in zip(workers, counts, strict=True):  # every send first
                worker = placement.workers[w]
                req = expert_pb2.RunExpertsRequest(layer=layer, expert_ids=ids_list[start : start + count])
                write_tensor(req.x, x_sorted[start : start + count])
                calls.append(_Call(worker, worker.stream.send_all([req]), start, count, time.monotonic()))
                start += count
            failed, overdue, fatal = [], [], None
            for call in calls:
                if await _answered_or_overdue(call, deadline):
                    fatal = fatal or await self._settle(call, deadline, y_sorted, failed)
                else:
                    call.worker.mark_overdue()  # the control plane's view: its replicas take new rows
                    overdue.append(call)
            if overdue:  # hedge each onto replicas if every one of its rows has one; else wait as before
                choice, _ = placement.choice()
                for call in overdue:
                    to = choice[ids[call.start : call.start + call.count]]
                    hedge = bool(((to >= 0) & (to != call.worker.index)).all())
                    fatal = fatal or await self._settle(call, deadline, y_sorted, failed, hedge)
            if fatal is not None:
                raise fatal
            if not failed:
                if rows is None:
                    return y_sorted, served_by
                y = torch.empty_like(x) if y is None else y
                y[rows] = y_sorted
                return y, served_by
            if rows is None:
                rows = torch.arange(x.shape[0])
            if y is None:
                y = torch.empty_like(x)
            keep = torch.ones(rows.shape[0], dtype=torch.bool)
            for start, count in failed:
                keep[start : start + count] = False
            y[rows[keep]] = y_sorted[keep]
            self.retries += 1
            rerouted = int((~keep).sum())
            self.rerouted += rerouted
            if self.metrics is not None:
                self.metrics.rerouted_rows.inc(rerouted)
            await placement.refresh_async()  # a restarted worker may already have published its new address
            todo = rows[~keep]

    async def _settle(self, call: _Call, deadline: float, y_sorted: torch.Tensor, failed: list,
                      hedge: bool = False):
        """Take one exchange's answer into its block of y_sorted (waiting up to the deadline; not at
        all when its rows are to be hedged) and return the exception that fails the exchange, if
        any. Rows to send again (their worker failed UNAVAILABLE, or stopped answering) go on `failed`."""
        worker, start, count = call.worker, call.start, call.count
        try:
            (resp,) = await call.exchange.result(0.0 if hedge else max(deadline - time.monotonic(), 0.01))
        except grpc.RpcError as exc:
            if hedge and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                # Given up: its late answer is dropped when it comes, and its rows go to a replica.
                log.warning("expert worker %d at %s: no answer in %.1fs; hedging %d rows onto replicas",
                            worker.index, worker.address, time.monotonic() - call.sent, count)
                self.hedges += 1
                failed.append((start, count))
                return None
            if exc.code() not in RETRYABLE or time.monotonic() >= deadline:
                return exc
            log.warning("expert worker %d at %s: %s; rerouting its rows", worker.index, worker.address, exc.code())
            worker.mark_down()
            failed.append((start, count))
            return None
        seconds = time.monotonic() - call.sent
        if self.metrics is not None:
            self._rpc_seconds(worker.index).observe(seconds)
        worker.answered(seconds)
        worker.rpcs += 1
        worker.rows += count
        self.worker_rpcs += 1
        try:
            read_tensor(resp.y, dtype=self.dtype, cols=self.hidden, max_rows=count, what="y",
                        out=y_sorted[start : start + count])
        except WireError as exc:  # the exchange fails; the stream and the worker stay good
            return RpcFailure(grpc.StatusCode.INTERNAL, f"expert worker {worker.index}: {exc}")
        return None

    def _rpc_seconds(self, worker: int):
        child = self._rpc_children.get(worker)
        if child is None:
            child = self._rpc_children[worker] = self.metrics.rpc_seconds.labels(str(worker))
        return child


class _Member:
    def __init__(self, x: torch.Tensor, deadline: float):
        self.x, self.deadline = x, deadline
        self.future = asyncio.get_running_loop().create_future()


class Coalescer:
    """Exchanges for one layer that are at the dispatcher in the same turn of the loop run as one.

    The first exchange of a layer to arrive leads: it yields one turn of the loop (every read that
    has already come in runs meanwhile, and each of those exchanges for the layer joins it), then
    dispatches what joined as one and hands each its rows. Alone, it dispatches its own rows as if
    there were no coalescer. One dispatch serves the batch until the latest deadline among its
    members (the router gives every exchange of a stream the same timeout)."""

    def __init__(self, dispatcher: Dispatcher, enabled: bool = True):
        self.dispatcher, self.enabled = dispatcher, enabled
        self._pending: dict[int, list[_Member]] = {}
        self.batches = self.coalesced = 0  # dispatches run; exchanges that shared one with another

    async def route(self, layer: int, x: torch.Tensor, deadline: float):
        """Dispatcher.route for one exchange, possibly run together with others of the same layer."""
        if not self.enabled:
            self.batches += 1
            return await self.dispatcher.route(layer, x, deadline)
        batch = self._pending.get(layer)
        if batch is not None:  # a leader is yielding its turn: join it
            member = _Member(x, deadline)
            batch.append(member)
            return await member.future
        batch = self._pending[layer] = []
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:  # the leader's caller went away: its members still run
            del self._pending[layer]
            if batch:
                first, *rest = batch
                asyncio.ensure_future(self._adopt(layer, first, rest))
            raise
        del self._pending[layer]
        self.batches += 1
        if not batch:
            return await self.dispatcher.route(layer, x, deadline)
        self.coalesced += len(batch) + 1
        # Shielded: a leader whose caller goes away mid-dispatch still hands its members their rows.
        return await asyncio.shield(asyncio.ensure_future(self._run(layer, x, deadline, batch)))

    async def _adopt(self, layer: int, first: _Member, rest: list[_Member]) -> None:
        """Dispatch the members of a leader that was cancelled, the first of them leading."""
        self.batches += 1
        try:
            if rest:
                _settle(first.future, await self._run(layer, first.x, first.deadline, rest))
            else:
                _settle(first.future, await self.dispatcher.route(layer, first.x, first.deadline))
        except Exception as exc:
            _settle(first.future, exc=exc)

    async def _run(self, layer: int, x: torch.Tensor, deadline: float, batch: list[_Member]):
        """The leader's rows x and its members', dispatched as one; the leader's share is returned."""
        try:
            y, experts, workers = await self.dispatcher.route(layer, torch.cat([x, *(m.x for m in batch)]),
                                                              max(deadline, *(m.deadline for m in batch)))
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.INVALID_ARGUMENT:
                for m in batch:
                    _settle(m.future, exc=exc)
                raise
            # Some member's rows were refused (an expert output that overflowed): each runs alone,
            # so the refusal fails only the exchange whose rows caused it.
            mine, *theirs = await asyncio.gather(self.dispatcher.route(layer, x, deadline),
                                                 *(self.dispatcher.route(layer, m.x, m.deadline) for m in batch),
                                                 return_exceptions=True)
            for m, result in zip(batch, theirs, strict=True):
                if isinstance(result, BaseException):
                    _settle(m.future, exc=result)
                else:
                    _settle(m.future, result)
            if isinstance(mine, BaseException):
                raise mine from None
            return mine
        except BaseException as exc:  # cancelled, or a bug: the members must not wait forever
            for m in batch:
                _settle(m.future, exc=exc if isinstance(exc, Exception) else
                        RpcFailure(grpc.StatusCode.UNAVAILABLE, "the exchange it was coalesced with was cancelled"))
            raise
        start = n = x.shape[0]
        for m in batch:
            rows = m.x.shape[0]
            _settle(m.future, (y[start : start + rows], experts[start : start + rows], workers[start : start + rows]))
            start += rows
        return y[:n], experts[:n], workers[:n]


def _settle(future: asyncio.Future, result=None, exc: Exception | None = None) -> None:
    if future.done():  # its caller gave up (deadline)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
