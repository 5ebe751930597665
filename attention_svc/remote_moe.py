"""RemoteMoE: the MoEBackend that sends a MoE layer's inputs to the router service.

submit() sends the Route request on a long-lived stream and returns at once, so the layer
stack computes the shared expert while the routed experts run remotely; result() waits for
the answer.
"""
from __future__ import annotations

import torch

from herdpb import router_pb2, router_pb2_grpc
from llama4.rpc import Duplex, channel
from llama4.wire import decode, fill


class _PendingRoute:
    def __init__(self, owner: "RemoteMoE", layer: int, dtype: torch.dtype, rows: int, cols: int):
        self._owner, self._layer, self._dtype, self._rows, self._cols = owner, layer, dtype, rows, cols

    def result(self) -> torch.Tensor:
        resp = self._owner._stream.receive(self._owner.timeout)
        y = decode(resp.y, dtype=self._dtype, cols=self._cols, max_rows=self._rows, what="y", exact=True)
        if len(resp.expert_ids) == self._rows and len(resp.workers) == self._rows:
            self._owner.last_routes[self._layer] = (torch.tensor(list(resp.expert_ids)), torch.tensor(list(resp.workers)))
        return y


class RemoteMoE:
    def __init__(self, router_address: str, timeout: float = 60.0):
        self._channel = channel(router_address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._stream = Duplex(self._stub.RouteStream)
        self.timeout = timeout
        self.route_rpcs = 0
        self.last_routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def submit(self, layer: int, x: torch.Tensor) -> _PendingRoute:
        req = router_pb2.RouteRequest(layer=layer)
        fill(req.x, x)
        self.route_rpcs += 1
        self._stream.send(req)
        return _PendingRoute(self, layer, x.dtype, x.shape[0], x.shape[1])

    def router_status(self) -> router_pb2.RouterStatus:
        return self._stub.Status(router_pb2.RouterStatusRequest(), timeout=5)
