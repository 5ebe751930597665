"""The Router gRPC service: top-1 routing, dispatch to expert workers, combine.

Per Route call: route every row (score on the input), group rows by the worker that
holds their expert, send one concurrent RunExperts per worker that got rows, and scatter
the answers back to token order. A worker that answers UNAVAILABLE (killed, restarting)
is looked up again in the registry and retried until the caller's deadline: RunExperts
is idempotent.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc
import redis
import torch

from herdpb import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from kernels import route_top1
from llama4.checkpoint import Checkpoint
from llama4.registry import WorkerRegistry
from llama4.rpc import channel, start_server
from llama4.weights import load_routers
from llama4.wire import WireError, decode, fill

log = logging.getLogger("herd.router")
MAX_ROWS = 1 << 16
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _Worker:
    def __init__(self, index: int, address: str, experts: list[int]):
        self.index, self.address, self.experts = index, address, experts
        self.channel = channel(address)
        self.stub = expert_pb2_grpc.ExpertWorkerStub(self.channel)
        self.rpcs = self.rows = 0
        self.healthy = True


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, registry: WorkerRegistry, worker_timeout: float = 30.0):
        self.cfg, self.dtype, self.registry = ckpt.config, dtype, registry
        self.routers = load_routers(ckpt, dtype, "cpu")
        self.worker_timeout = worker_timeout
        self.workers: dict[int, _Worker] = {}
        self.owner = torch.full((self.cfg.num_local_experts,), -1, dtype=torch.long)
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
            for index, info in published.items():
                current = self.workers.get(index)
                if current is None or current.address != info["address"]:
                    if current is not None:
                        current.channel.close()
                        log.warning("expert worker %d moved %s -> %s", index, current.address, info["address"])
                    self.workers[index] = _Worker(index, info["address"], info["experts"])
                for e in info["experts"]:
                    self.owner[e] = index

    def missing_experts(self) -> list[int]:
        return (self.owner < 0).nonzero().flatten().tolist()

    # ---- the data path ----
    def Route(self, request, context):
        try:
            if request.layer not in self.routers:
                raise WireError(f"layer={request.layer} is not a MoE layer; allowed: {sorted(self.routers)}")
            x = decode(request.x, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=MAX_ROWS)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        deadline = time.monotonic() + (context.time_remaining() or self.worker_timeout)
        with torch.inference_mode():
            expert_ids, scaled = route_top1(x, self.routers[request.layer])
        self.load[request.layer] += torch.bincount(expert_ids, minlength=self.cfg.num_local_experts)
        self.routes += 1
        try:
            y = self._dispatch(request.layer, scaled, expert_ids, deadline)
        except grpc.RpcError as exc:
            context.abort(exc.code(), f"expert worker call failed: {exc.details()}")
        return router_pb2.RouteResponse(y=fill(router_pb2.RouteResponse().y, y))

    def _dispatch(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, deadline: float) -> torch.Tensor:
        y = torch.empty_like(x)
        owners = self.owner[expert_ids]
        pending = {int(w): (owners == w).nonzero().flatten() for w in owners.unique().tolist()}
        while pending:
            if -1 in pending:
                self.refresh()
                owners = self.owner[expert_ids]
                pending = {int(w): (owners == w).nonzero().flatten() for w in owners.unique().tolist()}
                if -1 in pending:
                    raise _unavailable(f"no worker holds experts {self.missing_experts()}")
            calls = {}
            for w, rows in pending.items():
                worker = self.workers[w]
                req = expert_pb2.RunExpertsRequest(layer=layer, expert_ids=expert_ids[rows].tolist())
                fill(req.x, x[rows])
                calls[w] = (worker, worker.stub.RunExperts.future(req, timeout=max(deadline - time.monotonic(), 0.01)))
            failed = {}
            for w, (worker, call) in calls.items():
                rows = pending[w]
                try:
                    resp = call.result()
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE or time.monotonic() >= deadline:
                        raise
                    worker.healthy = False
                    failed[w] = rows
                    continue
                worker.healthy = True
                worker.rpcs += 1
                worker.rows += len(rows)
                self.worker_rpcs += 1
                y[rows] = decode(resp.y, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=len(rows), what="y").view(len(rows), -1)
            if failed:
                self.retries += 1
                time.sleep(0.2)  # a restarting worker needs a moment to publish its new address
                self.refresh()
            pending = failed
        return y

    def Status(self, request, context):
        status = router_pb2.RouterStatus(routes=self.routes, retries=self.retries, worker_rpcs=self.worker_rpcs)
        for w in sorted(self.workers.values(), key=lambda w: w.index):
            status.workers.add(index=w.index, address=w.address, experts=w.experts, healthy=w.healthy, rpcs=w.rpcs, rows=w.rows)
        for layer, counts in sorted(self.load.items()):
            status.loads.add(layer=layer, tokens_per_expert=counts.tolist())
        return status


def _unavailable(message: str) -> grpc.RpcError:
    class _Err(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return message

    return _Err(message)


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
    server, bound, _ = start_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
                                    ["herd.v1.Router"], host=host, port=port)
    return server, bound, servicer
