"""plumbing.duplex on grpc.aio: the same exchanges on a long-lived stream, run on one event loop.

AsyncDuplex is Duplex's client and serve_each_async its server, with the same rules: messages
numbered by the sender (exchange_id) and answered in order, echoing it; a request that fails is
answered with its failure and the stream goes on; a broken, wedged (STUCK_AFTER_S) or mispaired
stream fails what is in flight on it and is reopened by the next send. Everything runs on the
loop thread: a send writes on the stream at once and the reader task hands each answer to its
exchange's future, with no queue between threads.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time

import grpc

from herdpb import tensor_pb2
from plumbing.aio import Unparseable
from plumbing.duplex import STUCK_AFTER_S, Answers
from plumbing.grpc_server import RpcFailure

log = logging.getLogger("herd.duplex")


def _failed(response_type, exc: Exception):
    if isinstance(exc, grpc.RpcError):
        return response_type(failure=tensor_pb2.Failure(code=exc.code().value[0], details=exc.details()))
    log.error("a streamed request failed", exc_info=exc)
    return response_type(failure=tensor_pb2.Failure(code=grpc.StatusCode.INTERNAL.value[0],
                                                    details=f"{type(exc).__name__}: {exc}"))


async def _answer(run, request, response_type):
    if isinstance(request, Unparseable):  # mispaired from here on: nothing more on this stream is answered
        raise _Unpaired(request.why)
    try:
        resp = run(request)
        if inspect.isawaitable(resp):
            resp = await resp
    except Exception as exc:  # a bug hit by one request fails that request, not its stream
        resp = _failed(response_type, exc)
    resp.exchange_id = request.exchange_id
    return resp


async def serve_each_async(context, run, response_type, concurrent: bool = False) -> None:
    """The server side of an AsyncDuplex, as an aio stream handler's body: run(request) (a function
    or a coroutine function) answers each request; answers go back in request order. concurrent:
    a request is started as soon as it is read, while earlier ones are still running (the router:
    several exchanges of one stream, e.g. micro-batches, wait on workers at once)."""
    try:
        await _serve(context, run, response_type, concurrent)
    except _Unpaired as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc}; the stream is closed")


class _Unpaired(Exception):
    """A message that could not be parsed: its exchange_id is unknown, so no answer can be paired."""


async def _serve(context, run, response_type, concurrent: bool) -> None:
    if not concurrent:
        while (request := await context.read()) is not grpc.aio.EOF:
            await context.write(await _answer(run, request, response_type))
        return
    answers: asyncio.Queue = asyncio.Queue()

    async def read():
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                answers.put_nowait(asyncio.ensure_future(_answer(run, request, response_type)))
        finally:
            answers.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await answers.get()) is not None:
            await context.write(await task)
    finally:
        reader.cancel()
        while not answers.empty():
            task = answers.get_nowait()
            if task is not None:
                task.cancel()


class AsyncExchange(Answers):
    """The answers to one send_all(): await result() on the loop."""

    def __init__(self, count: int):
        super().__init__(count)
        self._done = asyncio.get_running_loop().create_future()

    def _answer(self, resp) -> bool:
        complete = self._record(resp)
        if complete and not self._done.done():
            self._done.set_result(None)
        return complete

    def _fail(self, exc: Exception) -> None:
        if not self._done.done():
            self._error = self._error or exc
            self._done.set_result(None)

    def done(self) -> bool:
        return self._done.done()

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` without giving the exchange up: True once it is done."""
        if not self._done.done() and timeout > 0:
            await asyncio.wait((self._done,), timeout=timeout)
        return self._done.done()

    async def result(self, timeout: float) -> list:
        """The exchange's responses in order; raises grpc.RpcError on failure or timeout. A timed-out
        exchange keeps its place on the stream (its late answers are dropped when they come)."""
        if not await self.wait(timeout):
            self._fail(self._timed_out(timeout))
        if self._error is not None:
            raise self._error
        return self._answers


# A stream that ends with one of these says something about the caller, not the peer's health.
_CALLERS_FAULT = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                  grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT)


def _broken(exc: grpc.RpcError) -> grpc.RpcError:
    """The error a whole stream ended with, as its exchanges in flight see it: the peer's going
    away is UNAVAILABLE (callers retry), however grpc.aio names it (a SIGKILLed peer's stream can
    end INTERNAL, "Internal error from Core"). An exchange's own failure is not this: it comes
    as an answer and keeps its code."""
    if exc.code() in _CALLERS_FAULT or exc.code() is grpc.StatusCode.UNAVAILABLE:
        return exc
    return RpcFailure(grpc.StatusCode.UNAVAILABLE, f"stream broke ({exc.code().name}: {exc.details()})")


class _AsyncCall:
    def __init__(self, open_call):
        self.call = open_call()
        self.waiting: collections.deque[AsyncExchange] = collections.deque()
        self.broken: Exception | None = None
        self.next_id = 1
        self.write_lock = asyncio.Lock()  # grpc.aio takes one write at a time; the lock keeps send order
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while (resp := await self.call.read()) is not grpc.aio.EOF:
                if not self.waiting:
                    raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"stream closed: an answer (message "
                                     f"{resp.exchange_id}) came with no exchange awaiting one")
                if self.waiting[0]._answer(resp):
                    self.waiting.popleft()
            self.fail(RpcFailure(grpc.StatusCode.UNAVAILABLE, "stream closed by the server"))
        except RpcFailure as exc:
            log.warning("%s", exc.details())
            self.close(exc)
        except grpc.RpcError as exc:
            self.fail(_broken(exc))
        except asyncio.CancelledError:
            self.fail(RpcFailure(grpc.StatusCode.CANCELLED, "stream closed"))

    def stuck(self) -> bool:
        head = self.waiting[0] if self.waiting else None
        return head is not None and head.abandoned_at is not None and \
            time.monotonic() - head.abandoned_at > STUCK_AFTER_S

    def close(self, exc: Exception) -> None:
        self.fail(exc)
        self.call.cancel()

    def fail(self, exc: Exception) -> None:
        self.broken = self.broken or exc
        waiting, self.waiting = self.waiting, collections.deque()
        for ex in waiting:
            ex._fail(exc)


class AsyncDuplex:
    """Duplex on a grpc.aio stream-stream call, used from its loop only. open_call() opens the
    stream (e.g. lambda: stub.RunExpertsStream(metadata=...)); send_all() writes one exchange's
    messages at once (numbered in order) and returns its AsyncExchange."""

    def __init__(self, open_call):
        self._open = open_call
        self._call: _AsyncCall | None = None

    def send_all(self, requests: list) -> AsyncExchange:
        ex = AsyncExchange(len(requests))
        call = self._call
        if call is not None and call.broken is None and call.stuck():
            call.close(RpcFailure(grpc.StatusCode.UNAVAILABLE, f"stream closed: its oldest exchange "
                                  f"went unanswered {STUCK_AFTER_S:.0f}s after its caller gave up"))
        if call is None or call.broken is not None:
            try:
                call = self._call = _AsyncCall(self._open)
            except Exception as exc:  # a closed channel
                ex._fail(RpcFailure(grpc.StatusCode.UNAVAILABLE, f"stream cannot open: {exc}"))
                return ex
        call.waiting.append(ex)
        ex.first_id = call.next_id
        call.next_id += len(requests)
        asyncio.ensure_future(self._write(call, ex, requests))
        return ex

    @staticmethod
    async def _write(call: _AsyncCall, ex: AsyncExchange, requests: list) -> None:
        # Tasks start in send order and the lock is FIFO: messages go out in the order of their
        # ids, one exchange's together.
        try:
            async with call.write_lock:
                for at, request in enumerate(requests):
                    request.exchange_id = ex.first_id + at
                    await call.call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError) as exc:
            call.fail(_broken(exc) if isinstance(exc, grpc.RpcError) else
                      RpcFailure(grpc.StatusCode.UNAVAILABLE, f"stream closed: {exc}"))

    def close(self, exc: Exception | None = None) -> None:
        """Close the stream; what is in flight on it fails with exc (default CANCELLED)."""
        call, self._call = self._call, None
        if call is not None:
            call.close(exc or RpcFailure(grpc.StatusCode.CANCELLED, "stream closed"))
