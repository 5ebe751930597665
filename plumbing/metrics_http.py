"""A Prometheus registry served over HTTP on its own port (router and expert workers)."""
from __future__ import annotations

from prometheus_client import start_http_server


def serve_metrics(registry, host: str = "127.0.0.1", port: int = 0) -> int:
    """Serve `registry` at http://host:port/metrics on a daemon thread; returns the bound port.
    Read-only counts, no credentials: bind it where only Prometheus reaches (loopback by default)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port
