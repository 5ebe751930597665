"""The Router gRPC service's data path: route, dispatch, combine.

Per Route exchange: route every row with the layer's gate (score on the input), group rows
by the worker that holds their expert (router_svc.placement), send one concurrent
RunExperts per worker that got rows, and combine the answers back into token order. A
worker that answers UNAVAILABLE (killed, restarting) is marked down: its rows go at once to
another replica, or, without one, wait for the worker to publish its new address;
RunExperts is idempotent, so retries run until the caller's deadline. A worker that stops
answering (frozen, wedged: its exchange overdue past the bound placement keeps for it) is
routed around the same way: the overdue exchange is given up on its stream (its late answer
is dropped) and its rows go to replicas; without a replica for every one of its rows it is
awaited until the deadline as before.
"""
from __future__ import annotations

import logging
import time

import grpc
import torch
from grpc_health.v1 import health_pb2

from herdpb import expert_pb2, router_pb2, router_pb2_grpc
from kernels import route_top1
from llama4.checkpoint import Checkpoint
from llama4.quant import serving_fingerprint
from llama4.weights import load_gates
from plumbing.duplex import serve_each
from plumbing.grpc_server import MAX_MESSAGE_BYTES, RpcFailure, start_server
from plumbing.registry import WorkerRegistry
from plumbing.tensor_codec import MAX_ROWS, WireError, read_tensor, write_tensor
from router_svc.metrics import RouterMetrics
from router_svc.placement import Placement

log = logging.getLogger("herd.router")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _answered_or_overdue(call, deadline: float) -> bool:
    """Wait for one exchange until it is answered (True) or overdue (False: its worker answered
    nothing, neither it nor a probe, for the worker's overdue bound); True at the deadline too."""
    worker, ex, _, _, sent = call
    while True:
        now = time.monotonic()
        wait_s = min(deadline - now, worker.overdue_in(sent, now))
        if wait_s <= 0:
            return now >= deadline or ex.wait(0.0)
        if ex.wait(wait_s):
            return True


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, registry: WorkerRegistry, worker_timeout: float = 30.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None, expert_dtype: str = "auto"):
        self.cfg, self.dtype = ckpt.config, dtype
        self.gates = load_gates(ckpt, dtype, "cpu")  # layer -> [E, H]
        self.fingerprint = serving_fingerprint(ckpt.fingerprint(), expert_dtype, ckpt.stored_fp8)
        self.placement = Placement(registry, self.cfg.num_local_experts, max_message_bytes, self.fingerprint, token)
        self.worker_timeout = worker_timeout
        self.tokens_per_expert = {l: torch.zeros(self.cfg.num_local_experts, dtype=torch.long) for l in self.gates}
        self.routes = self.retries = self.worker_rpcs = self.hedges = 0
        self.metrics = RouterMetrics(self)
        self._rpc_children: dict[int, object] = {}  # worker -> its herd:worker_rpc_seconds series

    def RouteStream(self, request_iterator, context):
        # A failed request is answered with its failure; the stream goes on (plumbing.duplex).
        return serve_each(request_iterator, lambda request: self.route(request, self.worker_timeout),
                          router_pb2.RouteResponse)

    def Route(self, request, context):
        try:
            return self.route(request, context.time_remaining() or self.worker_timeout)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def route(self, request, timeout: float) -> router_pb2.RouteResponse:
        """One exchange within `timeout` seconds; raises grpc.RpcError (INVALID_ARGUMENT for bad input)."""
        try:
            if request.layer not in self.gates:
                raise WireError(f"layer={request.layer} is not a MoE layer; allowed: {sorted(self.gates)}")
            x = read_tensor(request.x, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=MAX_ROWS)
        except WireError as exc:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        deadline = time.monotonic() + timeout
        with torch.inference_mode():
            expert_ids, scaled = route_top1(x, self.gates[request.layer])
        self.tokens_per_expert[request.layer] += torch.bincount(expert_ids, minlength=self.cfg.num_local_experts)
        self.routes += 1
        try:
            y, served_by = self._dispatch(request.layer, scaled, expert_ids, deadline)
        except grpc.RpcError as exc:
            raise RpcFailure(exc.code(), f"expert worker call failed: {exc.details()}") from None
        resp = router_pb2.RouteResponse(expert_ids=expert_ids.tolist(), workers=served_by.tolist())
        write_tensor(resp.y, y)
        return resp

    def _dispatch(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
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
                time.sleep(0.2)
                placement.refresh()
                continue
            if todo is None:
                served_by = owner
            else:
                served_by[todo] = owner
            rows = todo  # sorted position -> row of x; None: the identity
            if ids.shape[0] > 1:
                order = torch.argsort(owner * self.cfg.num_local_experts + ids, stable=True)
                rows = order if todo is None else todo[order]
                ids, owner = ids[order], owner[order]
            x_sorted = x if rows is None else x[rows]
            y_sorted = torch.empty_like(x_sorted)
            workers, counts = torch.unique_consecutive(owner, return_counts=True)
            ids_list = ids.tolist()
            calls, start = [], 0
            for w, count in zip(workers.tolist(), counts.tolist(), strict=True):  # every send first
                worker = placement.workers[w]
                req = expert_pb2.RunExpertsRequest(layer=layer, expert_ids=ids_list[start : start + count])
                write_tensor(req.x, x_sorted[start : start + count])
                calls.append((worker, worker.stream.send_all([req]), start, count, time.monotonic()))
                start += count
            failed, overdue, fatal = [], [], None
            for call in calls:
                if _answered_or_overdue(call, deadline):
                    error = self._settle(call, deadline, y_sorted, failed)
                    fatal = fatal or error
                else:
                    call[0].mark_overdue()  # the control plane's view: its replicas take new rows
                    overdue.append(call)
            if overdue:  # hedge each onto replicas if every one of its rows has one; else wait as before
                choice, _ = placement.choice()
                for call in overdue:
                    worker, _, start, count = call[:4]
                    to = choice[ids[start : start + count]]
                    hedge = bool(((to >= 0) & (to != worker.index)).all())
                    error = self._settle(call, deadline, y_sorted, failed, hedge)
                    fatal = fatal or error
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
            self.metrics.rerouted_rows.inc(int((~keep).sum()))
            placement.refresh()  # a restarted worker may already have published its new address
            todo = rows[~keep]

    def _settle(self, call, deadline: float, y_sorted: torch.Tensor, failed: list, hedge: bool = False):
        """Take one exchange's answer into its block of y_sorted (waiting up to the deadline; not at
        all when its rows are to be hedged) and return the exception that fails the Route, if any.
        Rows to send again (their worker failed UNAVAILABLE, or stopped answering) go on `failed`."""
        worker, ex, start, count, sent = call
        try:
            (resp,) = ex.result(0.0 if hedge else max(deadline - time.monotonic(), 0.01))
        except grpc.RpcError as exc:
            if hedge and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                # Given up: its late answer is dropped when it comes, and its rows go to a replica.
                log.warning("expert worker %d at %s: no answer in %.1fs; hedging %d rows onto replicas",
                            worker.index, worker.address, time.monotonic() - sent, count)
                self.hedges += 1
                failed.append((start, count))
                return None
            if exc.code() not in RETRYABLE or time.monotonic() >= deadline:
                return exc
            log.warning("expert worker %d at %s: %s; rerouting its rows", worker.index, worker.address, exc.code())
            worker.mark_down()
            failed.append((start, count))
            return None
        seconds = time.monotonic() - sent
        self._rpc_seconds(worker.index).observe(seconds)
        worker.answered(seconds)
        worker.rpcs += 1
        worker.rows += count
        self.worker_rpcs += 1
        try:
            read_tensor(resp.y, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=count, what="y",
                        out=y_sorted[start : start + count])
        except WireError as exc:  # the exchange fails; the stream and the worker stay good
            return RpcFailure(grpc.StatusCode.INTERNAL, f"expert worker {worker.index}: {exc}")
        return None

    def _rpc_seconds(self, worker: int):
        child = self._rpc_children.get(worker)
        if child is None:
            child = self._rpc_children[worker] = self.metrics.rpc_seconds.labels(str(worker))
        return child

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
          token: str | None = None, expert_dtype: str = "auto"):
    """token: the cluster token; callers of the router must send it, and it is sent to the workers.
    expert_dtype: how the workers hold experts (part of the fingerprint they must match)."""
    servicer = RouterServicer(Checkpoint(model_path), dtype, WorkerRegistry(redis_url, cluster),
                              worker_timeout=worker_timeout, max_message_bytes=max_message_bytes, token=token,
                              expert_dtype=expert_dtype)
    server, bound, health_servicer = start_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
                                                  ["herd.v1.Router"], host=host, port=port,
                                                  max_message_bytes=max_message_bytes,
                                                  secrets=[token] if token else None, what="cluster token")
    # Serving at once, not after the workers: liveness holds while experts load (minutes for a large
    # shard), and readiness ("" and the service) waits until every expert has a live worker.
    if not servicer.placement.all_experts_live():
        for name in ("", "herd.v1.Router"):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.placement.watch(health_servicer, ["herd.v1.Router"])
    return server, bound, servicer
