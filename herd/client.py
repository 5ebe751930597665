"""A small client for herd's public API (used by `herd generate/score/status --target`)."""
from __future__ import annotations

import os

import grpc

from herdpb import llama_pb2, llama_pb2_grpc
from llama4.errors import HerdInputError
from plumbing.auth import API_KEY_FILE, CLUSTER_TOKEN_FILE
from plumbing.grpc_server import channel


def default_secret(operator: bool = False) -> str | None:
    """The credential a local client sends: HERD_API_KEY, else the key `herd up` keeps under the
    herd home; operator=True prefers the cluster token (Status then shows internal addresses)."""
    from pathlib import Path

    from llama4.store import cache_home

    if os.environ.get("HERD_API_KEY") and not operator:
        return os.environ["HERD_API_KEY"]
    for name in ((CLUSTER_TOKEN_FILE, API_KEY_FILE) if operator else (API_KEY_FILE,)):
        path = Path(cache_home()) / name
        if path.exists():
            return path.read_text().strip()
    return os.environ.get("HERD_API_KEY")


class Client:
    def __init__(self, target: str, timeout: float = 600.0, secret: str | None = None, operator: bool = False,
                 tls_ca: bytes | None = None):
        """secret: an API key (default: default_secret()); tls_ca: PEM roots for a TLS listener."""
        self._channel = channel(target, secret=secret or default_secret(operator), tls_ca=tls_ca)
        self.stub = llama_pb2_grpc.LlamaStub(self._channel)
        self.timeout = timeout

    def generate(self, *, text=None, ids=None, chat=None, max_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
                 seed=None, ignore_eos=False, request_id="", session_id="", new_session=False, trace_routes=False,
                 images=()):
        """Stream GenerateResponses. With session_id, new_session=True starts the conversation;
        later turns continue it (a turn that raced another on the session fails with ABORTED)."""
        req = llama_pb2.GenerateRequest(request_id=request_id, session_id=session_id, new_session=new_session,
                                        trace_routes=trace_routes)
        if ids is not None:
            req.ids.ids.extend(ids)
        elif chat is not None:
            for m in chat:
                msg = req.chat.messages.add(role=m["role"])
                if isinstance(m["content"], str):
                    msg.content = m["content"]
                    continue
                for part in m["content"]:  # {"type": "text", "text": ...} or {"type": "image", "data": bytes}
                    if part["type"] == "image":
                        image = llama_pb2.ImagePart(data=part["data"], media_type=part.get("media_type", ""))
                        msg.parts.add(image=image)
                    else:
                        msg.parts.add(text=part["text"])
        else:
            req.text = text
        req.images.extend(llama_pb2.ImagePart(data=d) for d in images)  # with text or ids: one per <|image|>
        s = req.sampling
        s.max_tokens, s.temperature, s.top_p, s.top_k, s.ignore_eos = max_tokens, temperature, top_p, top_k, ignore_eos
        if seed is not None:
            s.seed = seed
        return self._call(lambda: self.stub.Generate(req, timeout=self.timeout), stream=True)

    def score(self, *, text=None, ids=None, images=()) -> llama_pb2.ScoreResponse:
        req = (llama_pb2.ScoreRequest(text=text) if ids is None
               else llama_pb2.ScoreRequest(ids=llama_pb2.TokenIds(ids=ids)))
        req.images.extend(llama_pb2.ImagePart(data=d) for d in images)
        return self._call(lambda: self.stub.Score(req, timeout=self.timeout))

    def status(self) -> llama_pb2.ClusterStatus:
        return self._call(lambda: self.stub.Status(llama_pb2.StatusRequest(), timeout=10))

    @staticmethod
    def _call(fn, stream=False):
        try:
            result = fn()
            return _checked(result) if stream else result
        except grpc.RpcError as exc:
            raise _as_input_error(exc) from None

    def close(self):
        self._channel.close()


def _checked(stream):
    try:
        yield from stream
    except grpc.RpcError as exc:
        raise _as_input_error(exc) from None


def _as_input_error(exc: grpc.RpcError):
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return HerdInputError(exc.details())
    return RuntimeError(f"{exc.code().name}: {exc.details()}")
