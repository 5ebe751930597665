"""RemoteMoE: the MoEBackend that sends a MoE layer's inputs to the router service.

submit() starts the Route RPC (a gRPC future) and returns at once, so the layer stack
computes the shared expert while the routed experts run remotely.
"""
from __future__ import annotations

import torch

from herdpb import router_pb2, router_pb2_grpc
from llama4.rpc import channel
from llama4.wire import decode, fill


class _PendingRoute:
    def __init__(self, future, dtype: torch.dtype, rows: int, cols: int):
        self._future, self._dtype, self._rows, self._cols = future, dtype, rows, cols

    def result(self) -> torch.Tensor:
        resp = self._future.result()
        return decode(resp.y, dtype=self._dtype, cols=self._cols, max_rows=self._rows, what="y")


class RemoteMoE:
    def __init__(self, router_address: str, timeout: float = 60.0):
        self._channel = channel(router_address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout
        self.route_rpcs = 0

    def submit(self, layer: int, x: torch.Tensor) -> _PendingRoute:
        req = router_pb2.RouteRequest(layer=layer)
        fill(req.x, x)
        self.route_rpcs += 1
        future = self._stub.Route.future(req, timeout=self.timeout)
        return _PendingRoute(future, x.dtype, x.shape[0], x.shape[1])

    def router_status(self) -> router_pb2.RouterStatus:
        return self._stub.Status(router_pb2.RouterStatusRequest(), timeout=5)
