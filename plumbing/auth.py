"""Who may call: API keys for the public API, a cluster token for the internal services.

Callers send `authorization: Bearer <secret>` metadata. A server built with `Guard` refuses
every call of a protected service without a matching secret with UNAUTHENTICATED; a method
may name other secrets that open it instead (the attention service's Status also opens to the
cluster token); the standard health and reflection services stay open (Kubernetes probes
carry no secret). Each credential opens only its own doors: a cluster token is no API key.
Secrets are compared in constant time against every accepted one. They come from the
environment or from files, never from argv, and are never logged. Every secret variable X may
instead name a file as X_FILE (how Kubernetes mounts a Secret), read when the process starts.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

API_KEYS_ENV, CLUSTER_TOKEN_ENV = "HERD_API_KEYS", "HERD_CLUSTER_TOKEN"
API_KEY_FILE, CLUSTER_TOKEN_FILE = "api-key", "cluster-token"  # 0600 files `herd up` keeps under the herd home
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


FILE_SUFFIX = "_FILE"


def env_secret(name: str) -> str | None:
    """The secret in environment variable `name`, else the contents of the file `name`_FILE names."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(name + FILE_SUFFIX)
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:  # the message names the variable and path, never the contents
        raise OSError(f"{name}{FILE_SUFFIX}={path}: cannot read the secret: {exc.strerror}") from None


def read_secrets(env: str, file: str | Path | None = None) -> list[str]:
    """Secrets from a comma-separated environment variable (or its X_FILE) and/or a file of one per line."""
    found = [s.strip() for s in (env_secret(env) or "").replace("\n", ",").split(",") if s.strip()]
    if file:
        found += [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
    return found


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def matches(secret: str | None, accepted: list[str]) -> bool:
    """Constant time in the secret: every accepted one is compared, whatever matched."""
    given = (secret or "").encode()
    ok = False
    for candidate in accepted:
        ok |= hmac.compare_digest(given, candidate.encode())
    return ok and secret is not None


def handler_like(handler, behaviour):
    """A method handler of handler's kind (streaming or not, each way) that runs behaviour."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour)
    return grpc.unary_unary_rpc_method_handler(behaviour)


def _refuse(handler, message: str):
    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return handler_like(handler, abort)


class Guard(grpc.ServerInterceptor):
    """Refuses calls to every service but health and reflection without an accepted secret.

    accepted, what: the secrets that open every method, and what they are called in the refusal;
    methods: {"/package.Service/Method": (accepted, what)} for a method that opens to others instead."""

    def __init__(self, accepted: list[str], what: str, methods: dict[str, tuple[list[str], str]] | None = None):
        if not accepted or any(not secrets for secrets, _ in (methods or {}).values()):
            raise ValueError("Guard needs at least one accepted secret for every door")
        self.doors = {**(methods or {}), None: (accepted, what)}

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        service = details.method.lstrip("/").split("/", 1)[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        accepted, what = self.doors.get(details.method, self.doors[None])
        if matches(bearer(details.invocation_metadata), accepted):
            return handler
        return _refuse(handler, f"missing or wrong {what} (send 'authorization: Bearer <{what}>')")


class _WithSecret(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, secret: str):
        self._header = ("authorization", f"Bearer {secret}")

    def _details(self, details):  # grpc passes a namedtuple
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def with_secret(ch: grpc.Channel, secret: str | None) -> grpc.Channel:
    """The channel, sending `authorization: Bearer <secret>` on every call (unchanged if None)."""
    return grpc.intercept_channel(ch, _WithSecret(secret)) if secret else ch
