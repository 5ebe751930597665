"""RemoteMoE: the MoEBackend that sends a MoE layer's inputs to the router service.

submit() sends the Route exchange on a long-lived stream and returns at once, so the layer
stack computes the shared expert while the routed experts run remotely; result() waits for
the answer: the routed rows and, for each, the expert and worker that served it. A step
larger than one gRPC message is split into several messages of whole rows, sent together.
Several exchanges may be in flight at once (the micro-batches of one step, llama4.model):
the router answers them in order on the one stream. A refusal of the rows' values
(INVALID_ARGUMENT: an expert output that overflowed, a non-finite row) is raised as
RowsRefused, which the engine pins on the sequence whose rows they were; every other failure
stays a grpc.RpcError, the cluster's, which fails the whole step.
"""
from __future__ import annotations

import grpc
import torch

from herdpb import router_pb2, router_pb2_grpc
from llama4.moe import Route, Routed, RowsRefused
from plumbing.duplex import Duplex, Exchange
from plumbing.grpc_server import MAX_MESSAGE_BYTES, channel
from plumbing.tensor_codec import WireError, read_tensor, rows_per_message, write_tensor


class _PendingRoute:
    def __init__(self, exchange: Exchange, timeout: float, dtype: torch.dtype, chunks: list[int], cols: int):
        self._exchange, self._timeout = exchange, timeout
        self._dtype, self._chunks, self._cols = dtype, chunks, cols  # chunks: rows per message

    def result(self) -> Routed:
        try:
            resps = self._exchange.result(self._timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RowsRefused(exc.details()) from exc
            raise
        ys, experts, workers = [], [], []
        for resp, rows in zip(resps, self._chunks, strict=True):
            ys.append(read_tensor(resp.y, dtype=self._dtype, cols=self._cols, max_rows=rows, what="y", exact=True))
            if len(resp.expert_ids) != rows or len(resp.workers) != rows:
                raise WireError(f"route answer names {len(resp.expert_ids)} experts and {len(resp.workers)} "
                                f"workers for {rows} rows")
            experts.extend(resp.expert_ids)
            workers.extend(resp.workers)
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return Routed(y, Route(torch.tensor(experts, dtype=torch.long), torch.tensor(workers, dtype=torch.long)))


class RemoteMoE:
    is_remote = True  # routed experts run elsewhere: a step's micro-batches can overlap them (llama4.engine)
    dispatch = "router"

    def __init__(self, router_address: str, timeout: float = 60.0, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 token: str | None = None):
        self.channel = channel(router_address, max_message_bytes, secret=token)
        self._stub = router_pb2_grpc.RouterStub(self.channel)
        self._stream = Duplex(self._stub.RouteStream)
        self.timeout, self.max_message_bytes = timeout, max_message_bytes
        self.route_rpcs = 0  # Route exchanges (one per MoE layer per step, whatever its messages)

    def submit(self, layer: int, x: torch.Tensor) -> _PendingRoute:
        step = rows_per_message(x.shape[1], x.dtype, self.max_message_bytes)
        reqs, chunks = [], []
        for start in range(0, max(x.shape[0], 1), step):
            req = router_pb2.RouteRequest(layer=layer)
            write_tensor(req.x, x[start : start + step])
            reqs.append(req)
            chunks.append(min(step, x.shape[0] - start))
        self.route_rpcs += 1
        return _PendingRoute(self._stream.send_all(reqs), self.timeout, x.dtype, chunks, x.shape[1])

    def router_status(self) -> router_pb2.RouterStatus:
        return self._stub.Status(router_pb2.RouterStatusRequest(), timeout=5)
