"""A small client for herd's public API (used by `herd generate/score/status --target`)."""
from __future__ import annotations

import grpc

from herdpb import llama_pb2, llama_pb2_grpc
from llama4.errors import HerdInputError
from plumbing.grpc_server import channel


class Client:
    def __init__(self, target: str, timeout: float = 600.0):
        self._channel = channel(target)
        self.stub = llama_pb2_grpc.LlamaStub(self._channel)
        self.timeout = timeout

    def generate(self, *, text=None, ids=None, chat=None, max_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
                 seed=None, ignore_eos=False, request_id="", session_id="", trace_routes=False):
        req = llama_pb2.GenerateRequest(request_id=request_id, session_id=session_id, trace_routes=trace_routes)
        if ids is not None:
            req.ids.ids.extend(ids)
        elif chat is not None:
            for m in chat:
                req.chat.messages.add(role=m["role"], content=m["content"])
        else:
            req.text = text
        s = req.sampling
        s.max_tokens, s.temperature, s.top_p, s.top_k, s.ignore_eos = max_tokens, temperature, top_p, top_k, ignore_eos
        if seed is not None:
            s.seed = seed
        return self._call(lambda: self.stub.Generate(req, timeout=self.timeout), stream=True)

    def score(self, *, text=None, ids=None) -> llama_pb2.ScoreResponse:
        req = (llama_pb2.ScoreRequest(text=text) if ids is None
               else llama_pb2.ScoreRequest(ids=llama_pb2.TokenIds(ids=ids)))
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
