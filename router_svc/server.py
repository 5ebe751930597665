"""The Router gRPC service: the API of the data path (router_svc.dispatch) and its status.

It runs on grpc.aio, on one event loop: a Route exchange is read, gated, dispatched to the
workers and answered on the loop thread, with no thread hand-off on either hop. Exchanges of
one stream run concurrently (an attention service's micro-batches wait on workers at once) and
are answered in order; exchanges for the same layer that are at the router at the same moment,
from any stream, go to each worker together (router_svc.dispatch.Coalescer).
"""
from __future__ import annotations

import logging
import time

import grpc
import torch
from grpc_health.v1 import health_pb2

from herdpb import router_pb2, router_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.quant import serving_fingerprint
from llama4.weights import load_gates
from plumbing.aio import LoopThread, add_service, start_aio_server
from plumbing.duplex_aio import serve_each_async
from plumbing.grpc_server import MAX_MESSAGE_BYTES, RpcFailure
from plumbing.registry import WorkerRegistry
from plumbing.tensor_codec import MAX_ROWS, WireError, read_tensor, write_tensor
from router_svc.dispatch import Coalescer, Dispatcher
from router_svc.metrics import RouterMetrics
from router_svc.placement import Placement
from router_svc.push import watch_placement

log = logging.getLogger("herd.router")
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"]


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, registry: WorkerRegistry, worker_timeout: float = 30.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None, expert_dtype: str = "auto",
                 coalesce: bool = True):
        self.cfg, self.dtype = ckpt.config, dtype
        self.fingerprint = serving_fingerprint(ckpt.fingerprint(), expert_dtype, ckpt.stored_fp8)
        self.placement = Placement(registry, self.cfg.num_local_experts, max_message_bytes, self.fingerprint, token)
        self.worker_timeout = worker_timeout
        self.metrics = RouterMetrics(self)
        self.dispatcher = Dispatcher(load_gates(ckpt, dtype, "cpu"), self.placement, self.cfg.hidden_size, dtype,
                                     self.metrics)
        self.gates = self.dispatcher.gates  # layer -> [E, H]
        self.coalescer = Coalescer(self.dispatcher, coalesce)
        self.routes = 0  # Route exchanges answered or failed
        self.loop = LoopThread("router-loop")

    # Counts the dispatcher keeps, read by Status and the metrics.
    tokens_per_expert = property(lambda self: self.dispatcher.tokens_per_expert)
    retries = property(lambda self: self.dispatcher.retries)
    worker_rpcs = property(lambda self: self.dispatcher.worker_rpcs)
    hedges = property(lambda self: self.dispatcher.hedges)

    async def RouteStream(self, request_iterator, context):
        # A failed request is answered with its failure; the stream goes on (plumbing.duplex_aio).
        await serve_each_async(context, lambda request: self.route_async(request, self.worker_timeout),
                               router_pb2.RouteResponse, concurrent=True)

    async def WatchPlacement(self, request_iterator, context):
        # The table pushed to attention services that dispatch directly, and their load reports (router_svc.push).
        await watch_placement(self, context)

    async def Route(self, request, context):
        try:
            return await self.route_async(request, context.time_remaining() or self.worker_timeout)
        except grpc.RpcError as exc:
            await context.abort(exc.code(), exc.details())

    def route(self, request, timeout: float) -> router_pb2.RouteResponse:
        """route_async from another thread (tests, tools)."""
        return self.loop.run(self.route_async(request, timeout))

    async def route_async(self, request, timeout: float) -> router_pb2.RouteResponse:
        """One exchange within `timeout` seconds; raises grpc.RpcError (INVALID_ARGUMENT for bad input)."""
        self.routes += 1
        try:
            if request.layer not in self.gates:
                raise WireError(f"layer={request.layer} is not a MoE layer; allowed: {sorted(self.gates)}")
            x = read_tensor(request.x, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=MAX_ROWS)
        except WireError as exc:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        y, expert_ids, served_by = await self.coalescer.route(request.layer, x, time.monotonic() + timeout)
        resp = router_pb2.RouteResponse(expert_ids=expert_ids.tolist(), workers=served_by.tolist())
        write_tensor(resp.y, y)
        return resp

    def Status(self, request, context):
        status = router_pb2.RouterStatus(routes=self.routes, retries=self.retries, worker_rpcs=self.worker_rpcs,
                                         fingerprint=self.fingerprint, hedges=self.hedges)
        for w in sorted(self.placement.workers.values(), key=lambda w: w.index):
            status.workers.add(index=w.index, address=w.address, experts=w.experts, healthy=w.healthy,
                               rpcs=w.rpcs, rows=w.rows, expert_bytes=w.expert_bytes, node_id=w.node_id,
                               node_ip=w.node_ip, overdue=bool(w.overdue_since), overdue_bound_s=w.latency.bound())
        for index, (address, why) in sorted(self.placement.refused.items()):
            status.workers.add(index=index, address=address, healthy=False, refused=why)
        for layer, counts in sorted(self.tokens_per_expert.items()):
            status.loads.add(layer=layer, tokens_per_expert=counts.tolist())
        return status


def serve(model_path: str, dtype: torch.dtype, redis_url: str, cluster: str, host: str = "127.0.0.1", port: int = 0,
          max_message_bytes: int = MAX_MESSAGE_BYTES, worker_timeout: float = 30.0,
          token: str | None = None, expert_dtype: str = "auto", coalesce: bool = True):
    """token: the cluster token; callers of the router must send it, and it is sent to the workers.
    expert_dtype: how the workers hold experts (part of the fingerprint they must match)."""
    servicer = RouterServicer(Checkpoint(model_path), dtype, WorkerRegistry(redis_url, cluster),
                              worker_timeout=worker_timeout, max_message_bytes=max_message_bytes, token=token,
                              expert_dtype=expert_dtype, coalesce=coalesce)
    server, bound, health_servicer = start(servicer, host, port, max_message_bytes, token)
    # Serving at once, not after the workers: liveness holds while experts load (minutes for a large
    # shard), and readiness ("" and the service) waits until every expert has a live worker.
    if not servicer.placement.all_experts_live():
        for name in ("", "herd.v1.Router"):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.placement.watch(health_servicer, ["herd.v1.Router"])
    return server, bound, servicer


def start(servicer: RouterServicer, host: str = "127.0.0.1", port: int = 0,
          max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None):
    """The router's gRPC server on the servicer's loop: (server, bound port, health)."""
    return start_aio_server(lambda s: add_service(s, servicer, ROUTER_SERVICE), ["herd.v1.Router"],
                            servicer.loop, host=host, port=port, max_message_bytes=max_message_bytes,
                            secrets=[token] if token else None, what="cluster token")
