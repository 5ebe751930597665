"""RemoteMoE: the MoEBackend that sends a MoE layer's inputs to the router service.

submit() sends the Route request on a long-lived stream and returns at once, so the layer
stack computes the shared expert while the routed experts run remotely; result() waits for
the answer: the routed rows and, for each, the expert and worker that served it.
"""
from __future__ import annotations

import torch

from herdpb import router_pb2, router_pb2_grpc
from llama4.moe import Route, Routed
from plumbing.duplex import Duplex
from plumbing.grpc_server import channel
from plumbing.tensor_codec import WireError, read_tensor, write_tensor


class _PendingRoute:
    def __init__(self, owner: RemoteMoE, dtype: torch.dtype, rows: int, cols: int):
        self._owner, self._dtype, self._rows, self._cols = owner, dtype, rows, cols

    def result(self) -> Routed:
        resp = self._owner._stream.receive(self._owner.timeout)
        y = read_tensor(resp.y, dtype=self._dtype, cols=self._cols, max_rows=self._rows, what="y", exact=True)
        if len(resp.expert_ids) != self._rows or len(resp.workers) != self._rows:
            raise WireError(f"route answer names {len(resp.expert_ids)} experts and {len(resp.workers)} workers "
                            f"for {self._rows} rows")
        return Routed(y, Route(torch.tensor(list(resp.expert_ids)), torch.tensor(list(resp.workers))))


class RemoteMoE:
    def __init__(self, router_address: str, timeout: float = 60.0):
        self._channel = channel(router_address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._stream = Duplex(self._stub.RouteStream)
        self.timeout = timeout
        self.route_rpcs = 0

    def submit(self, layer: int, x: torch.Tensor) -> _PendingRoute:
        req = router_pb2.RouteRequest(layer=layer)
        write_tensor(req.x, x)
        self.route_rpcs += 1
        self._stream.send(req)
        return _PendingRoute(self, x.dtype, x.shape[0], x.shape[1])

    def router_status(self) -> router_pb2.RouterStatus:
        return self._stub.Status(router_pb2.RouterStatusRequest(), timeout=5)
