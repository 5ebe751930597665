"""gRPC servers and channels as every herd service runs them: bind, health, reflection, limits."""
from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from plumbing.auth import Guard, with_secret

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC's cap on one message, each way (deploy: max_message_bytes)
# grpc.health.v1 service names: "" and each API's name answer readiness (can serve now);
# LIVENESS answers SERVING while the process can answer at all (Kubernetes livenessProbe).
LIVENESS = "liveness"
KEEPALIVE_MS = 30000


def start_server(add_servicers, service_names: list[str], host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 16, max_message_bytes: int = MAX_MESSAGE_BYTES, secrets: list[str] | None = None,
                 what: str = "API key", tls: tuple[bytes, bytes] | None = None,
                 methods: dict[str, tuple[list[str], str]] | None = None,
                 ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start a server on host:port (0 = a free port) with health and reflection; returns the bound port.
    secrets: callers must send one (plumbing.auth), or for a method in `methods` one of its own
    (methods: {"/package.Service/Method": (secrets, what)}); tls: (certificate chain, private key) PEM."""
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    interceptors = [Guard(secrets, what, methods)] if secrets else None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         interceptors=interceptors)
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    for name in ("", LIVENESS, *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def channel(address: str, max_message_bytes: int = MAX_MESSAGE_BYTES, secret: str | None = None,
            tls_ca: bytes | None = None) -> grpc.Channel:
    """A channel sending `secret` (an API key or the cluster token) on every call; TLS when
    tls_ca (the PEM roots to trust) is given."""
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.keepalive_time_ms", KEEPALIVE_MS)]
    if tls_ca is not None:
        ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    return with_secret(ch, secret)


def wait_serving(address: str, timeout: float, tls_ca: bytes | None = None) -> None:
    """Block until address reports SERVING on grpc.health.v1, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    with channel(address, tls_ca=tls_ca) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f}s")
            time.sleep(0.2)


class RpcFailure(grpc.RpcError):
    """A failed call raised by herd itself, shaped like the errors grpc raises."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details
