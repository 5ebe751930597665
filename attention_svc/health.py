"""Honest health for the attention service: readiness means its engine loop turns, its router
answers and (dispatch: direct) it holds a placement table; liveness ("liveness") means the
process can answer at all.

A watcher thread re-checks every CHECK_EVERY_S and sets grpc.health.v1 readiness ("" and
herd.v1.Llama); drain() turns readiness off for good when the service is told to stop.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_svc.engine_loop import EngineLoop

log = logging.getLogger("herd.attention")
CHECK_EVERY_S, ROUTER_TIMEOUT_S = 1.0, 1.0
ENGINE_STALL_S = 120.0  # a loop that has not turned this long (one step) is stuck
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    """waiting_for: what the MoE backend still waits for ('' when nothing; DirectMoE.not_ready), or None."""

    def __init__(self, loop: EngineLoop, router_channel: grpc.Channel | None, health_servicer, names: list[str],
                 waiting_for: Callable[[], str] | None = None):
        self.loop, self.health, self.names = loop, health_servicer, ["", *names]
        self._router = health_pb2_grpc.HealthStub(router_channel) if router_channel is not None else None
        self._waiting_for = waiting_for
        self._draining = threading.Event()
        self.reason = ""  # why it is not ready, for logs and Status

    def check(self) -> str:
        """'' when ready, else what is wrong."""
        if self._draining.is_set():
            return "draining: stopping"
        if not self.loop.alive(ENGINE_STALL_S):
            return "the engine loop is not running"
        if self._router is not None:
            try:
                status = self._router.Check(health_pb2.HealthCheckRequest(), timeout=ROUTER_TIMEOUT_S).status
            except grpc.RpcError as exc:
                return f"the router does not answer ({exc.code().name})"
            if status != SERVING:
                return "the router is not serving (some expert has no live worker)"
        return self._waiting_for() if self._waiting_for is not None else ""

    def watch(self) -> None:
        def loop():
            ever_ready = False  # not ready while starting (its router waits for the workers) is no news
            while not self._draining.is_set():
                reason = self.check()
                if ever_ready and reason and reason != self.reason:
                    log.warning("not ready: %s", reason)
                elif ever_ready and self.reason and not reason:
                    log.warning("ready again")
                self.reason = reason
                ever_ready = ever_ready or not reason
                for name in self.names:
                    self.health.set(name, NOT_SERVING if reason else SERVING)
                self._draining.wait(CHECK_EVERY_S)

        threading.Thread(target=loop, name="readiness", daemon=True).start()

    def drain(self) -> None:
        self._draining.set()
        self.reason = "draining: stopping"
        for name in self.names:
            self.health.set(name, NOT_SERVING)
