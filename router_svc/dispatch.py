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

Coalescer (the router's M:N fan-in): exchanges for the same layer that meet at the router (read
in the same turn of the loop, or come while that layer's previous dispatch is still out), from
any stream, are gated and sent as one exchange per worker, and each gets its own rows back. It
never waits for more work than is already there: no timer.
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
    """Route exchanges for one layer go to the workers together when they meet at the router.

    An exchange that finds its layer idle goes after one turn of the loop (every read that has
    already come in runs meanwhile, and the exchanges among them for the layer go with it). One
    that finds its layer's dispatch in flight (the workers are busy with that layer's rows) waits
    for it to come back and then goes with every other that came meanwhile, as one exchange per
    worker: Nagle's rule, with no timer, so an idle router adds no latency and a busy one sends
    each worker fewer, larger exchanges. Each gets its own rows back; a batch whose rows a worker
    refuses (INVALID_ARGUMENT: an expert output that overflowed) runs again member by member, so
    only the exchange whose rows caused it fails. A batch is dispatched until the latest deadline
    among its members; each member gives up at its own."""

    def __init__(self, dispatcher: Dispatcher, enabled: bool = True):
        self.dispatcher, self.enabled = dispatcher, enabled
        self._waiting: dict[int, list[_Member]] = {}  # layer -> exchanges for its next dispatch
        self._busy: set[int] = set()  # layers with a dispatch in flight or about to start
        self.batches = self.coalesced = 0  # dispatches run; exchanges that shared one with another

    async def route(self, layer: int, x: torch.Tensor, deadline: float):
        """Dispatcher.route for one exchange, possibly run together with others of the same layer."""
        if not self.enabled:
            self.batches += 1
            return await self.dispatcher.route(layer, x, deadline)
        member = _Member(x, deadline)
        self._waiting.setdefault(layer, []).append(member)
        if layer not in self._busy:
            self._busy.add(layer)
            asyncio.get_running_loop().call_soon(self._launch, layer)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            await asyncio.wait((member.future,), timeout=remaining)
        if not member.future.done():
            member.future.cancel()  # its batch skips it when it settles
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {max(remaining, 0):.1f}s")
        return member.future.result()

    def _launch(self, layer: int) -> None:
        """Dispatch what waits for the layer, or mark the layer idle."""
        batch = self._waiting.pop(layer, None)
        if not batch:
            self._busy.discard(layer)
            return
        asyncio.ensure_future(self._run(layer, batch))

    async def _run(self, layer: int, batch: list[_Member]) -> None:
        self.batches += 1
        if len(batch) > 1:
            self.coalesced += len(batch)
        try:
            await self._dispatch(layer, batch)
        except BaseException as exc:  # a bug (or the loop stopping): the members must not wait forever
            for m in batch:
                _settle(m.future, exc=exc if isinstance(exc, Exception) else
                        RpcFailure(grpc.StatusCode.UNAVAILABLE, "the router is stopping"))
            if not isinstance(exc, Exception):
                raise
            log.exception("a coalesced dispatch failed")
        finally:
            self._launch(layer)  # what came while this batch was out goes now, together

    async def _dispatch(self, layer: int, batch: list[_Member]) -> None:
        live = [m for m in batch if not m.future.done()]  # a member whose caller gave up is skipped
        if not live:
            return
        if len(live) == 1:
            m = live[0]
            try:
                _settle(m.future, await self.dispatcher.route(layer, m.x, m.deadline))
            except grpc.RpcError as exc:
                _settle(m.future, exc=exc)
            return
        try:
            y, experts, workers = await self.dispatcher.route(layer, torch.cat([m.x for m in live]),
                                                              max(m.deadline for m in live))
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.INVALID_ARGUMENT:
                for m in live:
                    _settle(m.future, exc=exc)
                return
            # Some member's rows were refused: each runs alone, so only its own exchange fails.
            results = await asyncio.gather(*(self.dispatcher.route(layer, m.x, m.deadline) for m in live),
                                           return_exceptions=True)
            for m, result in zip(live, results, strict=True):
                if isinstance(result, Exception):
                    _settle(m.future, exc=result)
                else:
                    _settle(m.future, result)
            return
        start = 0
        for m in live:
            rows = m.x.shape[0]
            _settle(m.future, (y[start : start + rows], experts[start : start + rows], workers[start : start + rows]))
            start += rows


def _settle(future: asyncio.Future, result=None, exc: Exception | None = None) -> None:
    if future.done():  # its caller gave up (deadline)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
