"""The ExpertWorker gRPC service: runs a shard's routed experts on rows it is sent.

It loads only its own experts' slices of every MoE layer and runs the grouped expert FFN
(kernels.grouped_expert_ffn). Every request is validated before its bytes are used. It serves
on grpc.aio: a small exchange (decode) is computed inline on the loop thread, with no hand-off;
a large one (prefill) in a thread, so health checks are answered while it computes.
"""
from __future__ import annotations

import asyncio
import ctypes
import threading
import time

import grpc
import numpy as np
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from herdpb import expert_pb2, expert_pb2_grpc
from kernels import grouped_expert_ffn
from llama4.checkpoint import Checkpoint
from llama4.quant import serving_fingerprint
from llama4.weights import expert_bytes, load_experts
from plumbing.aio import LoopThread, add_service, start_aio_server
from plumbing.duplex_aio import serve_each_async
from plumbing.grpc_server import MAX_MESSAGE_BYTES, RpcFailure
from plumbing.tensor_codec import MAX_ROWS, WireError, all_finite, read_tensor, write_tensor

# Exchanges of up to this many rows are computed on the loop thread (well under a millisecond of
# expert FFN per row on a CPU: the loop is never held long enough to delay a health check).
INLINE_ROWS = 64
WORKER_SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertWorker"]


class ExpertServicer(expert_pb2_grpc.ExpertWorkerServicer):
    def __init__(self, ckpt: Checkpoint, experts: list[int], dtype: torch.dtype, device: str,
                 expert_dtype: str = "auto"):
        self.cfg, self.dtype, self.device = ckpt.config, dtype, device
        ckpt.check_experts()  # every worker refuses a bad checkpoint at once, not only the one holding the bad expert
        # Published with the address: the router refuses workers serving other weights or other expert dtypes.
        self.fingerprint = serving_fingerprint(ckpt.fingerprint(), expert_dtype, ckpt.stored_fp8)
        self.experts = sorted(experts)
        # Global expert id -> index in this worker's weights, -1 for experts it does not hold (numpy:
        # checking a few ids costs a microsecond a step, not a torch op's several).
        self.global_to_local = np.full(self.cfg.num_local_experts, -1, dtype=np.int64)
        self.global_to_local[self.experts] = np.arange(len(self.experts))
        self.weights = load_experts(ckpt, self.experts, dtype, device, expert_dtype)
        self.expert_bytes = expert_bytes(self.weights)  # resident bytes by storage dtype, for herd status
        _return_freed_memory()
        self.rows_served = self.calls = 0
        self.compute_seconds = 0.0
        self.metrics = CollectorRegistry()
        self.metrics.register(_Sampled(self))
        self._lock = threading.Lock()  # one matmul stream at a time: the CPU is the bottleneck

    async def RunExpertsStream(self, request_iterator, context):
        # The router's one stream carries every concurrent Route: a failed request is answered
        # with its failure, never by ending the stream under the others.
        await serve_each_async(context, self.run_async, expert_pb2.RunExpertsResponse)

    async def RunExperts(self, request, context):
        try:
            return await self.run_async(request)
        except RpcFailure as exc:
            await context.abort(exc.code(), exc.details())

    async def run_async(self, request) -> expert_pb2.RunExpertsResponse:
        if len(request.expert_ids) <= INLINE_ROWS:
            return self.run(request)
        return await asyncio.to_thread(self.run, request)

    def run(self, request) -> expert_pb2.RunExpertsResponse:
        """One exchange: the experts' output for the request's rows; RpcFailure(INVALID_ARGUMENT) for bad
        input, FAILED_PRECONDITION for an expert this worker does not hold (a stale placement)."""
        try:
            if request.layer not in self.weights:
                raise WireError(f"layer={request.layer} is not a MoE layer; allowed: {sorted(self.weights)}")
            x = read_tensor(request.x, dtype=self.dtype, cols=self.cfg.hidden_size, max_rows=MAX_ROWS)
            n = x.shape[0]
            if len(request.expert_ids) != n:
                raise WireError(f"expert_ids has {len(request.expert_ids)} entries for {n} rows")
            ids = np.fromiter(request.expert_ids, dtype=np.int64, count=n)
            if n and (ids.min() < 0 or ids.max() >= self.cfg.num_local_experts):
                raise WireError(f"expert id out of range; allowed: [0, {self.cfg.num_local_experts})")
        except WireError as exc:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        local = self.global_to_local[ids]
        if (local < 0).any():  # the caller's placement is not this worker's: no fault of the rows
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION,
                             f"expert {int(ids[local < 0][0])} is not held by this worker; it holds {self.experts}")
        in_order = bool((local[1:] >= local[:-1]).all())  # the router sends rows grouped by expert
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            w13, w2 = self.weights[request.layer]
            y = grouped_expert_ffn(x.to(self.device), torch.from_numpy(local).to(self.device), w13, w2,
                                   sorted_by_expert=in_order)
            self.compute_seconds += time.perf_counter() - start
        if not all_finite(y):  # finite inputs can still overflow: the caller's fault, this call only
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"expert output overflowed for layer {request.layer}: inputs out of range "
                             f"(max |x| = {x.abs().max().item():.3g})")
        self.rows_served += n
        self.calls += 1
        resp = expert_pb2.RunExpertsResponse()
        write_tensor(resp.y, y)
        return resp


class _Sampled:
    """Prometheus metrics of one worker, read at scrape time."""

    def __init__(self, servicer: ExpertServicer):
        self.sv = servicer

    def collect(self):
        yield CounterMetricFamily("herd:expert_rows", "Rows this worker's experts computed.", value=self.sv.rows_served)
        yield CounterMetricFamily("herd:expert_calls", "RunExperts calls served.", value=self.sv.calls)
        yield CounterMetricFamily("herd:expert_compute_seconds", "Time spent in the expert FFN.",
                                  value=self.sv.compute_seconds)
        held = GaugeMetricFamily("herd:expert_resident_bytes", "Routed-expert bytes held, by storage dtype.",
                                 labels=["dtype"])
        for dtype, n in sorted(self.sv.expert_bytes.items()):
            held.add_metric([dtype], n)
        yield held
        yield GaugeMetricFamily("herd:experts_held", "Experts this worker holds (of every MoE layer).",
                                value=len(self.sv.experts))


def _return_freed_memory() -> None:
    """Quantizing at load frees each expert's fp32 copy, but glibc keeps the pages: hand them back."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def serve(model_path: str, experts: list[int], dtype: torch.dtype, device: str, host: str = "127.0.0.1", port: int = 0,
          max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None, expert_dtype: str = "auto"):
    """token: the cluster token every caller (the router) must send."""
    servicer = ExpertServicer(Checkpoint(model_path), experts, dtype, device, expert_dtype)
    server, bound, _ = start_aio_server(lambda s: add_service(s, servicer, WORKER_SERVICE),
                                        ["herd.v1.ExpertWorker"], LoopThread("worker-loop"), host=host, port=port,
                                        max_message_bytes=max_message_bytes, secrets=[token] if token else None)
    return server, bound, servicer
