"""gRPC plumbing every herd server shares: bind, health, reflection, message limits."""
from __future__ import annotations

import queue
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30000),
]


def start_server(add_servicers, service_names: list[str], host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 16, max_message_bytes: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start a server on host:port (0 = a free port) with health and reflection; returns the bound port."""
    options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def wait_serving(address: str, timeout: float) -> None:
    """Block until address reports SERVING on grpc.health.v1, or raise TimeoutError."""
    import time

    deadline = time.monotonic() + timeout
    with channel(address) as ch:
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


def run_until_signalled(server: grpc.Server, grace: float = 2.0) -> None:
    """Serve until SIGTERM or SIGINT, then stop with a grace period."""
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=grace).wait()


class RpcFailure(grpc.RpcError):
    """A failed call raised by herd itself, shaped like the errors grpc raises."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_CLOSE = object()


class Duplex:
    """A long-lived bidirectional stream used as a series of request/response pairs.

    A Python unary call costs ~1-2 ms of thread hand-offs per hop on a small machine; a
    message on an open stream costs a fraction of that. send() and receive() pair up under a
    lock (one exchange in flight per stream); a broken stream is reopened on the next send.
    """

    def __init__(self, method):
        self._method = method  # a stream-stream multicallable, e.g. stub.RouteStream
        self._lock = threading.Lock()
        self._call = None

    def _open(self) -> None:
        requests: queue.Queue = queue.Queue()
        responses: queue.Queue = queue.Queue()
        call = self._method(iter(requests.get, _CLOSE))
        threading.Thread(target=self._read, args=(call, responses), daemon=True).start()
        self._call, self._requests, self._responses = call, requests, responses

    @staticmethod
    def _read(call, out: queue.Queue) -> None:
        try:
            for resp in call:
                out.put(resp)
            out.put(RpcFailure(grpc.StatusCode.UNAVAILABLE, "stream closed by the server"))
        except grpc.RpcError as exc:
            out.put(exc)

    def send(self, request) -> None:
        self._lock.acquire()
        try:
            if self._call is None:
                self._open()
            self._requests.put(request)
        except BaseException:
            self._lock.release()
            raise

    def receive(self, timeout: float):
        """The response to the last send(); raises grpc.RpcError on failure or timeout."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            self._break()
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.1f}s") from None
        else:
            if isinstance(item, Exception):
                self._break()
                raise item
            return item
        finally:
            self._lock.release()

    def _break(self) -> None:
        if self._call is not None:
            self._requests.put(_CLOSE)
            self._call.cancel()
            self._call = None

    def close(self) -> None:
        with self._lock:
            self._break()
