"""asyncio gRPC as herd's data path runs it: one event loop per process, handlers inline.

The router and the expert workers serve their streams with grpc.aio: a message is read, handled
and answered on the one loop thread, with no hand-off to a pool thread and back (bench_transport
measures both shapes). The loop runs in a thread of its own (LoopThread), so the rest of a
service (probes, metrics, the Ray actor, tests) stays synchronous: AioServer and AioHealth give
the loop's server and health servicer the synchronous faces of grpc.Server and HealthServicer.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from plumbing.auth import OPEN_SERVICES, bearer, handler_like, matches
from plumbing.grpc_server import KEEPALIVE_MS, LIVENESS, MAX_MESSAGE_BYTES


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the loop from another thread and wait for its result."""
        return self.submit(coro).result(timeout)

    def in_loop(self) -> bool:
        return threading.current_thread() is self.thread


class AioServer:
    """A grpc.aio.Server on a LoopThread, stopped and awaited like a grpc.Server."""

    def __init__(self, server: grpc.aio.Server, loop: LoopThread):
        self.server, self.loop = server, loop

    def stop(self, grace: float | None):
        future = self.loop.submit(self.server.stop(grace))
        return _Stopped(future)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        try:
            self.loop.run(self.server.wait_for_termination(), timeout)
            return True
        except concurrent.futures.TimeoutError:
            return False


class _Stopped:
    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True


class AioHealth:
    """The loop's health servicer, set from any thread."""

    def __init__(self, servicer, loop: LoopThread):
        self.servicer, self.loop = servicer, loop

    def set(self, service: str, status) -> None:
        if self.loop.in_loop():
            asyncio.ensure_future(self.servicer.set(service, status))
        else:
            self.loop.run(self.servicer.set(service, status), timeout=10)


def _refuse(handler, message: str):
    async def abort(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return handler_like(handler, abort)


class AsyncGuard(grpc.aio.ServerInterceptor):
    """plumbing.auth.Guard for a grpc.aio server: every service but health and reflection needs
    an accepted secret (checked once per call, not per stream message)."""

    def __init__(self, accepted: list[str], what: str):
        if not accepted:
            raise ValueError("AsyncGuard needs at least one accepted secret")
        self.accepted, self.what = accepted, what

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/", 1)[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        if matches(bearer(details.invocation_metadata), self.accepted):
            return handler
        return _refuse(handler, f"missing or wrong {self.what} (send 'authorization: Bearer <{self.what}>')")


class Unparseable:
    """What a tolerant deserializer gives for bytes that are not a valid message (in place of
    grpc.aio's UNKNOWN): unary handlers answer INVALID_ARGUMENT, serve_each_async ends the
    stream with it (its exchanges can no longer be paired)."""

    def __init__(self, type_name: str, error: Exception):
        self.why = f"the request is not a valid {type_name}: {error}"


def _tolerant(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Unparseable(message_class.DESCRIPTOR.full_name, exc)
    return parse


def _checked(method):
    """A unary handler that refuses Unparseable; a plain function (a quick one, e.g. Status) runs
    inline on the loop."""
    is_async = inspect.iscoroutinefunction(method)

    async def unary(request, context):
        if isinstance(request, Unparseable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)
        return await method(request, context) if is_async else method(request, context)
    return unary


def add_service(server: grpc.aio.Server, servicer, service) -> None:
    """Register servicer's coroutine methods for `service` (a protobuf ServiceDescriptor), with
    deserializers that never raise: unparseable bytes reach the handler as Unparseable. (The
    generated add_*_to_server would let grpc.aio answer them UNKNOWN.) A streaming method must be
    a coroutine; a method the servicer does not define is left to gRPC (UNIMPLEMENTED)."""
    handlers = {}
    for method in service.methods:
        fn = getattr(servicer, method.name, None)
        if fn is None or not any(method.name in vars(cls) for cls in type(servicer).__mro__
                                 if not cls.__module__.startswith("herdpb.")):
            continue
        parse = _tolerant(message_factory.GetMessageClass(method.input_type))
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make, fn = grpc.unary_unary_rpc_method_handler, _checked(fn)
        handlers[method.name] = make(fn, request_deserializer=parse, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def start_aio_server(add_servicers, service_names: list[str], loop: LoopThread, host: str = "127.0.0.1",
                     port: int = 0, max_message_bytes: int = MAX_MESSAGE_BYTES, secrets: list[str] | None = None,
                     what: str = "cluster token") -> tuple[AioServer, int, AioHealth]:
    """plumbing.grpc_server.start_server for a grpc.aio server on `loop`: health, reflection,
    limits, the secret callers must send; returns the bound port."""

    async def start():
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options, interceptors=[AsyncGuard(secrets, what)] if secrets else None)
        add_servicers(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind {host}:{port}")
        await server.start()
        for name in ("", LIVENESS, *service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return server, bound, health_servicer

    server, bound, health_servicer = loop.run(start(), timeout=30)
    return AioServer(server, loop), bound, AioHealth(health_servicer, loop)


def aio_channel(address: str, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """A grpc.aio channel (create it on the loop that will use it); callers pass their secret as
    call metadata (auth_metadata)."""
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.keepalive_time_ms", KEEPALIVE_MS)]
    return grpc.aio.insecure_channel(address, options=options)


def auth_metadata(secret: str | None) -> tuple:
    return (("authorization", f"Bearer {secret}"),) if secret else ()
