"""DirectMoE: the MoEBackend of `dispatch: direct`, which gates a MoE layer's rows here and sends
each expert worker its rows itself, on its own streams (look-aside, the shape of gRPC's grpclb
and xDS: the router owns the table and hands it out; the data does not pass through it).

The gate is one small matmul on rows this service already holds, so the router's hop is saved
on every MoE layer. The dispatch is the router's own code (router_svc.dispatch.Dispatcher: sort
by worker and expert, one exchange per worker, retries on UNAVAILABLE, hedging of overdue
exchanges onto replicas, waiting for a restarted worker up to the deadline), run on this
backend's loop over PushedPlacement, a copy of the router's expert-to-worker table that the
router pushes on a side stream (Router.WatchPlacement, router_svc.push) at once and whenever it
changes. The router stays the one owner of placement, worker health, replicas and the counts:
the table's healthy and overdue flags set the local view whenever the router changes them, and
in between what this service sees first counts, as it does in the router (a worker whose
exchange fails UNAVAILABLE is marked down, one whose exchange goes unanswered past its bound is
overdue; both probes, every PROBE_EVERY_S, keep the overdue judgment from hedging a worker that
is only slow). About once a second the load this service sent (rows per expert, exchanges and
rows per worker, retries, hedges) goes back to the router on the same stream, so `herd status`
and the router's /metrics count it as in router mode.

Until a first table has come, the backend is not ready (readiness NOT_SERVING) and an exchange
waits for one (up to its deadline) rather than failing. A table it cannot use (another model, an
expert out of range, a worker named twice, an older version on the same stream) is refused
alone: logged, counted, the last good table kept, the stream and the exchanges going on. The
stream is reopened with backoff when it breaks (the router restarted).
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch

from herdpb import router_pb2, router_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.moe import Route, Routed, RowsRefused
from llama4.weights import load_gates
from plumbing.aio import LoopThread, aio_channel, auth_metadata
from plumbing.grpc_server import MAX_MESSAGE_BYTES, RpcFailure, channel
from plumbing.tensor_codec import all_finite
from router_svc.dispatch import Dispatcher
from router_svc.placement import PROBE_EVERY_S, Worker, WorkerTable

log = logging.getLogger("herd.attention")
REPORT_EVERY_S = 1.0
REOPEN_MIN_S, REOPEN_MAX_S = 0.1, 2.0  # backoff between attempts to reopen the placement stream
ANSWER_SLACK_S = 1.0  # result() waits this much past the dispatch's deadline, so the dispatch's own failure comes first


class TableRefused(ValueError):
    """A pushed PlacementTable this service cannot use."""


class PushedPlacement(WorkerTable):
    """The router's table as this attention service holds it, changed on the DirectMoE's loop only.

    Like the router's, it only grows or moves: a worker missing from a table (a router that has
    just restarted and not read the registry yet) keeps its last known address."""

    def __init__(self, num_experts: int, max_message_bytes: int, fingerprint: str, token: str | None = None):
        super().__init__(num_experts, max_message_bytes, token)
        self.fingerprint = fingerprint  # the model this service serves: a table for another is refused
        self.version = 0  # of the table applied last; 0: none yet
        self._flags: dict[int, tuple[bool, bool]] = {}  # index -> (healthy, overdue) as the router last said

    def check(self, table: router_pb2.PlacementTable) -> None:
        """TableRefused naming what makes the table unusable here."""
        if table.fingerprint != self.fingerprint:
            raise TableRefused(f"table v{table.version} is for model {table.fingerprint or 'unknown'}; this "
                               f"attention service serves model {self.fingerprint}")
        if table.num_experts != self.num_experts:
            raise TableRefused(f"table v{table.version} has num_experts={table.num_experts}; the model has "
                               f"{self.num_experts}")
        seen = set()
        for w in table.workers:
            if w.index < 0 or w.index in seen:
                raise TableRefused(f"table v{table.version} names worker {w.index} "
                                   f"{'twice' if w.index in seen else '(a negative index)'}")
            seen.add(w.index)
            if not w.address:
                raise TableRefused(f"table v{table.version}: worker {w.index} has no address")
            bad = sorted({e for e in w.experts if not 0 <= e < self.num_experts})
            if bad:
                raise TableRefused(f"table v{table.version}: worker {w.index} holds experts {bad[:8]}; allowed: "
                                   f"0 to {self.num_experts - 1}")
            if len(set(w.experts)) != len(w.experts):
                raise TableRefused(f"table v{table.version}: worker {w.index} names an expert twice")

    def apply(self, table: router_pb2.PlacementTable) -> None:
        """Take a checked table: a worker whose address or experts changed is replaced (its
        counts not yet reported carry over), and each healthy or overdue flag the router changed
        since its last table sets the local view."""
        moved = False
        for w in table.workers:
            experts, current = list(w.experts), self.workers.get(w.index)
            if current is None or current.address != w.address or current.experts != experts:
                worker = Worker(w.index, w.address, experts, self.max_message_bytes, self.token)
                if current is not None:
                    log.warning("expert worker %d moved %s -> %s", w.index, current.address, w.address)
                    current.close()
                    worker.rpcs, worker.rows = current.rpcs, current.rows
                self.workers[w.index] = worker
                self._flags.pop(w.index, None)
                moved = True
            _take_flags(self.workers[w.index], self._flags.get(w.index), w.healthy, w.overdue)
            self._flags[w.index] = (w.healthy, w.overdue)
        if moved:
            self._index_replicas()
        self.version = table.version

    async def refresh_async(self) -> None:
        """The dispatcher's wait for a (re)published worker: tables are applied on this loop as they
        come, so there is nothing to read; it only lets the loop turn."""
        await asyncio.sleep(0)


def _take_flags(worker: Worker, before: tuple[bool, bool] | None, healthy: bool, overdue: bool) -> None:
    """Set what the router changed (everything, for a worker new here); what it did not change
    stays as this service last saw it."""
    was_healthy, was_overdue = before if before is not None else (not healthy, not overdue)
    if healthy != was_healthy:
        if not healthy and worker.healthy:
            worker.mark_down()
        elif healthy:
            worker.healthy = True
    if overdue != was_overdue:
        worker.overdue_since = (worker.overdue_since or time.monotonic()) if overdue else 0.0


class _Pending:
    def __init__(self, future, timeout: float, device: torch.device):
        self._future, self._timeout, self._device = future, timeout, device

    def result(self) -> Routed:
        try:
            y, expert_ids, workers = self._future.result(self._timeout + ANSWER_SLACK_S)
        except TimeoutError:
            self._future.cancel()
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no answer from the expert workers within {self._timeout:.0f}s") from None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RowsRefused(exc.details()) from exc
            raise
        return Routed(y if y.device == self._device else y.to(self._device), Route(expert_ids, workers))


class _Refused:
    """Rows refused before they went out (non-finite values), as the router refuses them."""

    def __init__(self, why: str):
        self._why = why

    def result(self) -> Routed:
        raise RowsRefused(self._why)


class DirectMoE:
    """The MoEBackend that sends rows straight to the expert workers (RemoteMoE's interface)."""

    is_remote = True  # routed experts run elsewhere: a step's micro-batches can overlap them (llama4.engine)
    dispatch = "direct"

    def __init__(self, ckpt: Checkpoint, router_address: str, dtype: torch.dtype, fingerprint: str,
                 timeout: float = 60.0, max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None):
        cfg = ckpt.config
        self.router_address, self.timeout, self.max_message_bytes = router_address, timeout, max_message_bytes
        self.channel = channel(router_address, max_message_bytes, secret=token)  # Status; health.py's readiness
        self._stub = router_pb2_grpc.RouterStub(self.channel)
        self._metadata = auth_metadata(token)
        self.placement = PushedPlacement(cfg.num_local_experts, max_message_bytes, fingerprint, token)
        self.dispatcher = Dispatcher(load_gates(ckpt, dtype, "cpu"), self.placement, cfg.hidden_size, dtype)
        self.dtype = dtype
        self.route_rpcs = 0  # Route-equivalent exchanges (one per MoE layer per micro-batch)
        self.tables_refused, self.refusal = 0, ""  # tables refused so far, and why the last one was
        self._reported = self._counts()  # what the router has been sent, to report deltas
        self._known: set[int] = set()  # workers the current stream's last table named: the router knows them
        self.loop = LoopThread("direct-moe")
        self._tasks = self.loop.run(self._start(), timeout=10)

    # ---- the data path (MoEBackend) ----
    def submit(self, layer: int, x: torch.Tensor):
        """Gate and send x [N, H] of MoE layer `layer` on the backend's loop; returns at once."""
        self.route_rpcs += 1
        rows = x.detach()
        if rows.device.type != "cpu" or not rows.is_contiguous():
            rows = rows.to("cpu").contiguous()
        if not all_finite(rows):
            return _Refused(f"x of layer {layer} contains NaN or infinity")
        deadline = time.monotonic() + self.timeout
        return _Pending(self.loop.submit(self.dispatcher.route(layer, rows, deadline)), self.timeout, x.device)

    def router_status(self) -> router_pb2.RouterStatus:
        return self._stub.Status(router_pb2.RouterStatusRequest(), timeout=5)

    def not_ready(self) -> str:
        """'' once a table has come; else why exchanges cannot go out yet (readiness, attention_svc.health)."""
        if self.placement.version:
            return ""
        return "no placement table from the router yet" + (f" (refused: {self.refusal})" if self.refusal else "")

    def close(self) -> None:
        """Stop watching and close every stream (tests; a service runs until its process ends)."""
        async def stop():
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for worker in list(self.placement.workers.values()):
                worker.close()

        self.loop.run(stop(), timeout=10)
        self.channel.close()

    # ---- the side stream: tables in, reports out ----
    async def _start(self) -> list[asyncio.Task]:
        return [asyncio.ensure_future(self._watch()), asyncio.ensure_future(self._probe())]

    async def _watch(self) -> None:
        """Keep the placement stream open: take each table, report while it is open, reopen with backoff."""
        router_channel = aio_channel(self.router_address, self.max_message_bytes)
        stub = router_pb2_grpc.RouterStub(router_channel)
        pause, connected = REOPEN_MIN_S, False
        try:
            while True:
                call = stub.WatchPlacement(metadata=self._metadata)
                reporter, version = None, None  # version: of the last table taken on this stream
                try:
                    async for table in call:
                        if not self._take(table, version):
                            continue
                        version = table.version
                        if reporter is None:
                            reporter = asyncio.ensure_future(self._report(call))
                            pause = REOPEN_MIN_S
                            if not connected:
                                log.info("placement table v%d from the router at %s (%d workers)", version,
                                         self.router_address, len(table.workers))
                            connected = True
                    why = "the router ended it"
                except grpc.RpcError as exc:
                    why = f"{exc.code().name}: {exc.details()}"
                except Exception as exc:  # a bug: this stream ends, the next one is opened
                    log.exception("the placement stream failed")
                    why = f"{type(exc).__name__}: {exc}"
                finally:
                    if reporter is not None:
                        reporter.cancel()
                    call.cancel()
                if connected:
                    log.warning("placement stream to the router at %s lost (%s); reopening", self.router_address, why)
                connected = False
                await asyncio.sleep(pause)
                pause = min(pause * 2, REOPEN_MAX_S)
        finally:
            await router_channel.close()

    def _take(self, table: router_pb2.PlacementTable, last_version: int | None) -> bool:
        """Apply one pushed table (True), or refuse it alone (False: logged, counted, the last kept)."""
        try:
            self.placement.check(table)
            if last_version is not None and table.version <= last_version:
                raise TableRefused(f"table v{table.version} is not newer than v{last_version}, taken on this stream")
        except TableRefused as exc:
            self.tables_refused += 1
            if str(exc) != self.refusal:
                log.warning("refused a placement table from the router at %s: %s", self.router_address, exc)
            self.refusal = str(exc)
            return False
        self.placement.apply(table)
        self._known = {w.index for w in table.workers}
        self.refusal = ""
        return True

    async def _report(self, call) -> None:
        """Every REPORT_EVERY_S, what was sent since the last report (nothing when nothing was).
        What a broken stream did not take is in the next stream's first report."""
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            now = self._counts()
            report = self._delta(now)
            if report is None:
                continue
            try:
                await call.write(report)
            except (grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError):  # broken: _watch reopens it
                return
            self._reported = {**now, "workers": {**self._reported["workers"],
                                                 **{w.index: now["workers"][w.index] for w in report.workers}}}

    def _counts(self) -> dict:
        """The counts reports are made of, as they stand (read on the loop, where the dispatcher counts)."""
        d = self.dispatcher
        return {"tokens": {layer: counts.clone() for layer, counts in d.tokens_per_expert.items()},
                "workers": {w.index: (w.rpcs, w.rows) for w in list(self.placement.workers.values())},
                "routes": self.route_rpcs, "retries": d.retries, "hedges": d.hedges, "rerouted": d.rerouted}

    def _delta(self, now: dict) -> router_pb2.PlacementReport | None:
        """A report of now minus what was reported; workers the router's table does not name yet wait."""
        was = self._reported
        report = router_pb2.PlacementReport(
            routes=now["routes"] - was["routes"], retries=now["retries"] - was["retries"],
            hedges=now["hedges"] - was["hedges"], rerouted_rows=now["rerouted"] - was["rerouted"])
        for layer, counts in sorted(now["tokens"].items()):
            delta = counts - was["tokens"][layer]
            if delta.any():
                report.loads.add(layer=layer, tokens_per_expert=delta.tolist())
        for index, (rpcs, rows) in sorted(now["workers"].items()):
            old_rpcs, old_rows = was["workers"].get(index, (0, 0))
            if index in self._known and (rpcs, rows) != (old_rpcs, old_rows):
                report.workers.add(index=index, rpcs=rpcs - old_rpcs, rows=rows - old_rows)
        return report if report.ByteSize() else None

    async def _probe(self) -> None:
        """Probe every worker as the router does: its answers are what tells a slow worker (awaited)
        from a frozen one (its overdue exchange hedged)."""
        while True:
            for worker in list(self.placement.workers.values()):
                worker.probe()
            await asyncio.sleep(PROBE_EVERY_S)
