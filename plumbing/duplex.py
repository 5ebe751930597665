"""A long-lived bidirectional gRPC stream used as a series of request/response pairs."""
from __future__ import annotations

import queue
import threading
import time

import grpc

from plumbing.grpc_server import RpcFailure

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
        self.send_all([request])

    def receive(self, timeout: float):
        """The response to the last send(); raises grpc.RpcError on failure or timeout."""
        return self.receive_all(1, timeout)[0]

    def send_all(self, requests: list) -> None:
        """Start one exchange of several messages; receive_all() must follow (it frees the stream)."""
        self._lock.acquire()
        try:
            if self._call is None:
                self._open()
            for request in requests:
                self._requests.put(request)
        except BaseException:
            self._lock.release()
            raise

    def receive_all(self, count: int, timeout: float) -> list:
        """The `count` responses of the exchange, in order; on any failure the stream is broken
        (so no late answer can pair with a later exchange) and grpc.RpcError raised."""
        deadline = time.monotonic() + timeout
        try:
            out = []
            for _ in range(count):
                try:
                    item = self._responses.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    self._break()
                    raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.1f}s") from None
                if isinstance(item, Exception):
                    self._break()
                    raise item
                out.append(item)
            return out
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
