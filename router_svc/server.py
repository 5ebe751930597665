"""The Router gRPC service: top-1 routing, dispatch to expert workers, combine.

Per Route call: route every row (score on the input), group rows by the worker that
holds their expert, send one concurrent RunExperts per worker that got rows, and scatter
the answers back to token order. Where an expert has replicas, each expert's rows go to one
of its healthy replicas. A worker that answers UNAVAILABLE (killed, restarting) is marked
down: its rows go at once to another replica, or, without one, wait for the worker to
publish its new address; RunExperts is idempotent, so retries run until the caller's deadline.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
import torch

from herdpb import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from kernels import route_top1
from llama4.checkpoint import Checkpoint
from llama4.registry import WorkerRegistry
from llama4.rpc import Duplex, RpcFailure, channel, start_server
from llama4.weights import load_routers
from llama4.wire import WireError, decode, fill

log = logging.getLogger("herd.router")
MAX_ROWS = 1 << 16
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
RETRY_DOWN_AFTER_S = 5.0
PROBE_EVERY_S, PROBE_TIMEOUT_S = 1.0, 1.0


class _Worker:
    def __init__(self, index: int, address: str, experts: list[int]):
        self.index, self.address, self.experts = index, address, experts
        self.channel = channel(address)
        self.stub = expert_pb2_grpc.ExpertWorkerStub(self.channel)
        self.stream = Duplex(self.stub.RunExpertsStream)
        self.rpcs = self.rows = 0
        self.healthy = True
        self.down_since = 0.0

    def usable(self) -> bool:
        # A worker marked down is tried again after a while (it may have been a blip).
        return self.healthy or time.monotonic() - self.down_since > RETRY_DOWN_AFTER_S

    def mark_down(self) -> None:
        self.healthy, self.down_since = False, time.monotonic()

    def probe(self) -> bool:
        try:
            resp = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, registry: WorkerRegistry, worker_timeout: float = 30.0):
        self.cfg, self.dtype, self.registry = ckpt.config, dtype, registry
        self.routers = load_routers(ckpt, dtype, "cpu")
        self.worker_timeout = worker_timeout
        self.workers: dict[int, _Worker] = {}
        self.replicas: dict[int, list[int]] = {}  # expert -> workers holding it
        self.load = {l: torch.zeros(self.cfg.num_local_experts, dtype=torch.long) for l in self.routers}
        self.routes = self.retries = self.worker_rpcs = 0
        self._lock = threading.Lock()

    # ---- placement map, from the registry ----
    def refresh(self) -> None:
        try:
            published = self.registry.workers()
        except redis.RedisError as exc:  # keep the last known placement; retried on the next failure
            log.warning("worker registry unavailable: %s", exc)
            return
        with self._lock:
            replicas: dict[int, list[int]] = {}
            for index, info in sorted(published.items()):
                current = self.workers.get(index)
                if current is None or current.address != info["address"]:
                    if current is not None:
                        current.stream.close()
                        current.channel.close()
                        log.warning("expert worker %d moved %s -> %s", index, current.address, info["address"])
                    self.workers[index] = _Worker(index, info["address"], info["experts"])
                for e in info["experts"]:
                    replicas.setdefault(e, []).append(index)
            self.replicas = replicas

    def watch(self, health_servicer, service_names: list[str]) -> None:
        """Probe every worker's health in the background and serve NOT_SERVING while some
        expert has no live holder: probes and load balancers see a router that cannot route."""

        def loop():
            while True:
                self.refresh()
                for worker in list(self.workers.values()):
                    if worker.probe():
                        worker.healthy = True
                    elif worker.healthy:
                        log.warning("expert worker %d at %s fails its health check", worker.index, worker.address)
                        worker.mark_down()
                live = all(any(self.workers[w].healthy for w in self.replicas.get(e, []))
                           for e in range(self.cfg.num_local_experts))
                status = health_pb2.HealthCheckResponse.SERVING if live else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", *service_names):
                    health_servicer.set(name, status)
                time.sleep(PROBE_EVERY_S)

        threading.Thread(target=loop, name="worker-probe", daemon=True).start()

    def missing_experts(self) -> list[int]:
        return [e for e in range(self.cfg.num_local_experts) if e not in self.replicas]

    def _assign(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """The worker for each row: one usable replica per expert (spread by expert id), -1 if none."""
        choice = torch.full((self.cfg.num_local_experts,), -1, dtype=torch.long)
        for e in expert_ids.unique().tolist():
            holders = self.replicas.get(e, [])
            usable = [w for w in holders if self.workers[w].usable()]
            if usable:
                choice[e] = usable[e % len(usable)]
        return choice[expert_ids]

    # ---- the data path ----
    def RouteStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.Route(request, context, self.worker_timeout)

    def Route(self, request, context, timeout: float | None = None):
        try:
            if request.layer not in self.routers:
                raise WireError(f"layer={request.layer} is not a MoE layer; allowed: {sorted(self.routers)}")
            x = decode(request.x, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=MAX_ROWS)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        deadline = time.monotonic() + (timeout or context.time_remaining() or self.worker_timeout)
        with torch.inference_mode():
            expert_ids, scaled = route_top1(x, self.routers[request.layer])
        self.load[request.layer] += torch.bincount(expert_ids, minlength=self.cfg.num_local_experts)
        self.routes += 1
        try:
            y, served_by = self._dispatch(request.layer, scaled, expert_ids, deadline)
        except grpc.RpcError as exc:
            context.abort(exc.code(), f"expert worker call failed: {exc.details()}")
        resp = router_pb2.RouteResponse(expert_ids=expert_ids.tolist(), workers=served_by.tolist())
        fill(resp.y, y)
        return resp

    def _dispatch(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, deadline: float) -> torch.Tensor:
        y = torch.empty_like(x)
        served_by = torch.full((x.shape[0],), -1, dtype=torch.long)
        todo = torch.arange(x.shape[0])
        while todo.numel():
            owner = self._assign(expert_ids[todo])
            if (owner < 0).any():  # every holder is down: wait for one to (re)publish
                if time.monotonic() >= deadline:
                    raise RpcFailure(grpc.StatusCode.UNAVAILABLE,
                                     f"no usable worker holds experts {expert_ids[todo][owner < 0].unique().tolist()}")
                time.sleep(0.2)
                self.refresh()
                continue
            calls = []
            for w in owner.unique().tolist():  # every send first: the workers compute concurrently
                rows = todo[owner == w]
                worker = self.workers[w]
                req = expert_pb2.RunExpertsRequest(layer=layer, expert_ids=expert_ids[rows].tolist())
                fill(req.x, x[rows])
                worker.stream.send(req)
                calls.append((worker, rows))
            failed, fatal = [], None
            for worker, rows in calls:  # every send gets its receive (it releases the stream)
                try:
                    resp = worker.stream.receive(timeout=max(deadline - time.monotonic(), 0.01))
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE or time.monotonic() >= deadline:
                        fatal = fatal or exc
                        continue
                    log.warning("expert worker %d at %s: %s; rerouting its rows", worker.index, worker.address, exc.code())
                    worker.mark_down()
                    failed.append(rows)
                    continue
                worker.healthy = True
                served_by[rows] = worker.index
                worker.rpcs += 1
                worker.rows += len(rows)
                self.worker_rpcs += 1
                y[rows] = decode(resp.y, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=len(rows), what="y", exact=True)
            if fatal is not None:
                raise fatal
            if failed:
                self.retries += 1
                self.refresh()  # a restarted worker may already have published its new address
                todo = torch.cat(failed)
            else:
                todo = todo[:0]
        return y, served_by

    def Status(self, request, context):
        status = router_pb2.RouterStatus(routes=self.routes, retries=self.retries, worker_rpcs=self.worker_rpcs)
        for w in sorted(self.workers.values(), key=lambda w: w.index):
            status.workers.add(index=w.index, address=w.address, experts=w.experts, healthy=w.healthy, rpcs=w.rpcs, rows=w.rows)
        for layer, counts in sorted(self.load.items()):
            status.loads.add(layer=layer, tokens_per_expert=counts.tolist())
        return status


def serve(model_path: str, dtype: torch.dtype, redis_url: str, cluster: str, host: str = "127.0.0.1", port: int = 0,
          wait_for_workers: float = 120.0):
    servicer = RouterServicer(Checkpoint(model_path), dtype, WorkerRegistry(redis_url, cluster))
    deadline = time.monotonic() + wait_for_workers
    servicer.refresh()
    while servicer.missing_experts():
        if time.monotonic() > deadline:
            raise TimeoutError(f"router: no worker published experts {servicer.missing_experts()}")
        time.sleep(0.2)
        servicer.refresh()
    server, bound, health_servicer = start_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
                                                  ["herd.v1.Router"], host=host, port=port)
    servicer.watch(health_servicer, ["herd.v1.Router"])
    return server, bound, servicer
