"""Placement: which expert worker holds which experts, which of them are alive, who gets a row.

The worker table comes from the registry (a restarted worker publishes its new address
under its old index, and the table follows it). The table only grows or moves: a worker
missing from the registry (Redis restarted empty, or away) keeps its last known address
until it publishes again, so a Redis outage never empties the router. A background probe
marks workers up or down and sets readiness; `choice` picks one usable replica per expert,
preferring workers that answer: a worker that stopped answering (its probe timed out, or an
exchange went unanswered past its overdue bound, `Latency`) keeps its rows only where no
replica can take them, and is taken back once it answers again. WorkerTable is what a
dispatcher needs of all this (workers, replicas, choice); the router's Placement fills it from
the registry, an attention service with `dispatch: direct` from the tables the router pushes.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herdpb import expert_pb2_grpc
from plumbing.aio import aio_channel, auth_metadata
from plumbing.duplex_aio import AsyncDuplex
from plumbing.grpc_server import RpcFailure, channel
from plumbing.registry import WorkerRegistry

log = logging.getLogger("herd.router")
RETRY_DOWN_AFTER_S = 5.0
# Probes overlap (one in flight per worker), so a frozen worker delays nobody else's, and a live
# worker answers one at least every OVERDUE_FLOOR_S / 2: its exchanges are never overdue while
# it answers probes, however long one takes.
PROBE_EVERY_S, PROBE_TIMEOUT_S = 0.5, 1.0
# The overdue bound: an exchange unanswered this long past its send, or past the worker's last
# answer if later, means the worker stopped answering. RFC 6298's retransmission timeout (smoothed
# latency + 4 mean deviations), with a floor above a busy host's scheduling stalls and a cap
# that routes around a frozen worker within seconds; OVERDUE_CAP_S until a first answer.
OVERDUE_FLOOR_S, OVERDUE_CAP_S = 1.0, 3.0
_SERVING = health_pb2.HealthCheckResponse.SERVING


class Latency:
    """A worker's recent exchange latency (smoothed mean and mean deviation, RFC 6298's gains)
    and the bound past which an unanswered exchange is overdue."""

    GAIN, DEVIATION_GAIN, DEVIATIONS = 1 / 8, 1 / 4, 4

    def __init__(self):
        self.num_samples = 0
        self.mean_s = self.deviation_s = 0.0

    def observe(self, seconds: float) -> None:
        if self.num_samples == 0:
            self.mean_s, self.deviation_s = seconds, seconds / 2
        else:
            self.deviation_s += self.DEVIATION_GAIN * (abs(seconds - self.mean_s) - self.deviation_s)
            self.mean_s += self.GAIN * (seconds - self.mean_s)
        self.num_samples += 1

    def bound(self) -> float:
        if self.num_samples == 0:
            return OVERDUE_CAP_S
        return min(max(self.mean_s + self.DEVIATIONS * self.deviation_s, OVERDUE_FLOOR_S), OVERDUE_CAP_S)


class Worker:
    """One expert worker as the router sees it: its address, experts, stream and health. The data
    stream (grpc.aio, opened on the dispatcher's loop at first use) is separate from the channel
    that probes its health (synchronous, from the probe thread)."""

    def __init__(self, index: int, address: str, experts: list[int], max_message_bytes: int,
                 token: str | None = None):
        self.index, self.address, self.experts = index, address, experts
        self.max_message_bytes, self._metadata = max_message_bytes, auth_metadata(token)
        self.channel = channel(address, max_message_bytes, secret=token)
        self._stream: AsyncDuplex | None = None
        self._data_channel = self._loop = None
        self.rpcs = self.rows = 0
        self.expert_bytes: dict[str, int] = {}  # resident routed-expert bytes by storage dtype, as published
        self.node_id = self.node_ip = ""  # the Ray node it runs on, as published
        self.healthy = True
        self.down_since = 0.0
        self.latency = Latency()
        self.heard_at = time.monotonic()  # its last answer (exchange or probe)
        self.overdue_since = 0.0  # when an exchange of its went overdue; 0.0: it answers
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._probing = False

    @property
    def stream(self) -> AsyncDuplex:
        """The RunExperts stream; used from the dispatcher's loop only."""
        if self._stream is None:
            self._loop = asyncio.get_running_loop()
            self._data_channel = aio_channel(self.address, self.max_message_bytes)
            stub = expert_pb2_grpc.ExpertWorkerStub(self._data_channel)
            self._stream = AsyncDuplex(lambda: stub.RunExpertsStream(metadata=self._metadata))
        return self._stream

    def usable(self) -> bool:
        # A worker marked down is tried again after a while (it may have been a blip).
        return self.healthy or time.monotonic() - self.down_since > RETRY_DOWN_AFTER_S

    def answering(self) -> bool:
        """Healthy and no exchange of its overdue: a replica to prefer."""
        return self.healthy and not self.overdue_since

    def mark_down(self) -> None:
        self.healthy, self.down_since = False, time.monotonic()

    def answered(self, seconds: float | None = None) -> None:
        """It answered (an exchange that took `seconds`, or a probe): it is taken back if it was overdue."""
        if seconds is not None:
            self.latency.observe(seconds)
        self.heard_at = time.monotonic()
        self.healthy = True
        if self.overdue_since:
            log.warning("expert worker %d at %s answers again after %.1fs", self.index, self.address,
                        self.heard_at - self.overdue_since)
            self.overdue_since = 0.0

    def overdue_in(self, sent: float, now: float) -> float:
        """Seconds until an exchange sent at `sent` and unanswered is overdue (<= 0: it is): the
        worker has answered nothing, neither it nor a probe, for its overdue bound."""
        return max(sent, self.heard_at) + self.latency.bound() - now

    def mark_overdue(self) -> None:
        if not self.overdue_since:
            self.overdue_since = time.monotonic()
            log.warning("expert worker %d at %s stopped answering (an exchange is overdue past %.1fs)",
                        self.index, self.address, self.latency.bound())

    def probe(self) -> None:
        """Start a health check unless one is in flight; its answer (or timeout) updates the worker."""
        if self._probing:
            return
        self._probing = True
        try:
            self._health.Check.future(health_pb2.HealthCheckRequest(),
                                      timeout=PROBE_TIMEOUT_S).add_done_callback(self._probed)
        except Exception:  # a closed channel: nothing to probe
            self._probing = False

    def _probed(self, future) -> None:
        self._probing = False
        if future.cancelled():  # its channel was closed: the worker moved or the router stops
            return
        try:
            serving = future.result().status == _SERVING
        except (grpc.RpcError, grpc.FutureCancelledError):
            serving = False
        if serving:
            self.answered()
        elif self.healthy:
            log.warning("expert worker %d at %s fails its health check", self.index, self.address)
            self.mark_down()

    def close(self) -> None:
        """From any thread: the data stream is closed on its loop."""
        self.channel.close()
        stream, data_channel, loop = self._stream, self._data_channel, self._loop
        if stream is None:
            return

        async def close():
            # UNAVAILABLE: an exchange in flight to the old address is retried at the new one.
            stream.close(RpcFailure(grpc.StatusCode.UNAVAILABLE, f"expert worker {self.index} moved or went away"))
            await data_channel.close()

        if loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                asyncio.ensure_future(close())
                return
        except RuntimeError:  # no loop in this thread
            pass
        asyncio.run_coroutine_threadsafe(close(), loop)


class WorkerTable:
    """The workers a dispatcher sends rows to, which experts each holds, and which one gets a row
    (choice). Fed from the registry (Placement, the router's) or from the tables the router
    pushes (attention_svc.direct_moe.PushedPlacement, dispatch: direct)."""

    def __init__(self, num_experts: int, max_message_bytes: int, token: str | None = None):
        self.num_experts, self.max_message_bytes = num_experts, max_message_bytes
        self.token = token  # the cluster token, sent to the workers
        self.workers: dict[int, Worker] = {}
        self.replicas: dict[int, list[int]] = {}  # expert -> workers holding it
        self._choice: tuple | None = None  # (replicas it was built from, choice [E], complete) while all are healthy

    def _index_replicas(self) -> None:
        """Rebuild expert -> holders after self.workers changed (a new dict: choice's cache follows it)."""
        replicas: dict[int, list[int]] = {}
        for index, worker in sorted(self.workers.items()):
            for e in worker.experts:
                replicas.setdefault(e, []).append(index)
        self.replicas = replicas

    def missing_experts(self) -> list[int]:
        """Experts no published worker holds."""
        return [e for e in range(self.num_experts) if e not in self.replicas]

    def all_experts_live(self) -> bool:
        return all(any(self.workers[w].healthy for w in self.replicas.get(e, [])) for e in range(self.num_experts))

    def choice(self) -> tuple[torch.Tensor, bool]:
        """The worker for each expert [E] (one usable replica, spread by expert id, one that answers
        if any does; -1 if none) and whether every expert has one. While every worker answers the
        table is built once per change of the workers, not per Route."""
        all_healthy = all(w.answering() for w in list(self.workers.values()))
        cached = self._choice
        if all_healthy and cached is not None and cached[0] is self.replicas:
            return cached[1], cached[2]
        replicas = self.replicas
        table = [-1] * self.num_experts
        for e, holders in replicas.items():
            usable = [w for w in holders if self.workers[w].answering()] or \
                [w for w in holders if self.workers[w].usable()]
            if usable and 0 <= e < self.num_experts:
                table[e] = usable[e % len(usable)]
        choice = torch.tensor(table, dtype=torch.long)
        complete = -1 not in table
        if all_healthy:
            self._choice = (replicas, choice, complete)
        return choice, complete


class Placement(WorkerTable):
    """The router's table, read from the worker registry."""

    def __init__(self, registry: WorkerRegistry, num_experts: int, max_message_bytes: int, fingerprint: str = "",
                 token: str | None = None):
        super().__init__(num_experts, max_message_bytes, token)
        self.registry = registry
        self.fingerprint = fingerprint  # the model the router serves: workers serving another are refused
        self.refused: dict[int, tuple[str, str]] = {}  # index -> (address, why)
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Re-read the registry; keep the last known table while it is unreachable."""
        try:
            published = self.registry.workers()
        except redis.RedisError as exc:
            log.warning("worker registry unavailable: %s", exc)
            return
        with self._lock:
            for index, info in sorted(published.items()):
                theirs = info.get("fingerprint", "")
                if self.fingerprint and theirs != self.fingerprint:
                    why = (f"worker {index} at {info['address']} serves model {theirs or 'unknown'}, "
                           f"the router serves model {self.fingerprint}")
                    if self.refused.get(index) != (info["address"], why):
                        log.error("refused %s", why)
                    self.refused[index] = (info["address"], why)
                    continue
                self.refused.pop(index, None)
                current = self.workers.get(index)
                if current is None or current.address != info["address"] or current.experts != info["experts"]:
                    if current is not None:
                        current.close()
                        log.warning("expert worker %d moved %s -> %s", index, current.address, info["address"])
                    self.workers[index] = Worker(index, info["address"], info["experts"], self.max_message_bytes,
                                                 self.token)
                worker = self.workers[index]
                worker.expert_bytes = dict(info.get("expert_bytes") or {})
                worker.node_id, worker.node_ip = info.get("node_id", ""), info.get("node_ip", "")
            self._index_replicas()

    async def refresh_async(self) -> None:
        """refresh() from the dispatcher's loop (the registry is read in a thread: Redis blocks)."""
        await asyncio.to_thread(self.refresh)

    def watch(self, health_servicer, service_names: list[str]) -> None:
        """Probe every worker's health in the background and set readiness ("" and the service
        names) NOT_SERVING while some expert has no live holder: load balancers see a router that
        cannot route. Liveness (service "liveness") is not touched: a router waiting for a worker
        to reload is alive and must not be restarted."""

        def loop():
            while True:
                self.refresh()
                for worker in list(self.workers.values()):
                    worker.probe()
                serving = health_pb2.HealthCheckResponse.SERVING
                status = serving if self.all_experts_live() else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", *service_names):
                    health_servicer.set(name, status)
                time.sleep(PROBE_EVERY_S)

        threading.Thread(target=loop, name="worker-probe", daemon=True).start()
