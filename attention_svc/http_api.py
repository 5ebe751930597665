"""The OpenAI-compatible HTTP API: the same engine loop as the gRPC API, in the same process.

GET /v1/models; POST /v1/completions and /v1/chat/completions, whole or streamed as server-sent
events; GET /metrics (Prometheus). Parameters follow OpenAI's API reference. Parameters OpenAI
does not have are refused with 400, as OpenAI does; OpenAI parameters that change the output
and herd does not implement (penalties, logit_bias, tools, ...) are refused unless they are at
their neutral value; those that do not (user, metadata, store, ...) are accepted and ignored.
Chat content parts may be images as `image_url` parts with `data:` URLs (herd fetches nothing).
herd's own parameters (pass them with the SDK's `extra_body`): `session_id`, `new_session`,
`trace_routes` (each choice gets `routes`: per token, [layer, expert, worker] of every MoE layer),
`top_k`, `ignore_eos`, `stop_token_ids`, `return_token_ids` (each choice gets `token_ids`).
Every error is OpenAI's error body: a string that is not valid Unicode anywhere in a request
is 400 naming its field, and an unexpected failure inside herd is a 500 that names nothing
internal, logged and counted (herd:http_internal_errors).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from attention_svc.engine_loop import ABORTED
from attention_svc.server import MAX_LABEL_CHARS
from attention_svc.sessions import SessionError
from llama4.engine import QueueFull
from llama4.engine import Request as EngineRequest
from llama4.errors import HerdInputError
from llama4.images import with_images
from llama4.sampling import SamplingParams
from llama4.tokenizer import Detokenizer
from plumbing.auth import matches

COMMON = {"model", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "user", "max_tokens",
          "frequency_penalty", "presence_penalty", "logit_bias", "logprobs"}
COMPLETION = COMMON | {"prompt", "best_of", "echo", "suffix"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                 "function_call", "parallel_tool_calls", "response_format", "metadata", "store", "service_tier",
                 "modalities", "audio", "prediction", "reasoning_effort", "web_search_options"}
HERD = {"session_id", "new_session", "trace_routes", "top_k", "ignore_eos", "stop_token_ids", "return_token_ids"}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}  # no effect on the output
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
           "echo": (False,), "suffix": ("",), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
           "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
           "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": ()}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 16
MAX_CHOICES = 64  # prompts x n of one request
MAX_STOP = 16
MAX_BODY_BYTES = 16 * 2**20  # a request body beyond this is refused (413) before it is read whole
MAX_TOP_LOGPROBS = {"completion": 5, "chat": 20}  # OpenAI's limits
# JSON's \uXXXX escapes can spell a lone UTF-16 surrogate; json.loads joins every valid pair, so
# any surrogate left in a parsed string is unpaired: no tokenizer, template or encoder takes it.
SURROGATE = re.compile("[\ud800-\udfff]")
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics", "/health")  # metric labels
log = logging.getLogger("herd.http")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def _typed(body: dict, name: str, kinds: tuple, default=None, what: str = ""):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _bad(name, f"{name}={json.dumps(value)[:40]} is invalid; allowed: {what}")
    return value


def _number(body, name, default, lo, hi, integer=False):
    kinds = (int,) if integer else (int, float)
    what = f"{'an integer' if integer else 'a number'} from {lo} to {hi}"
    value = _typed(body, name, kinds, default, what)
    if value is not None and not lo <= value <= hi:
        raise _bad(name, f"{name}={value} is invalid; allowed: {what}")
    return value


def _invalid_unicode(body) -> ApiError | None:
    """400 naming the first string (a value or a key) of a parsed body that holds a lone surrogate."""
    todo = [(body, "")]
    while todo:  # a loop, not recursion: json.loads already bounded the depth, this walk adds none
        value, where = todo.pop()
        if isinstance(value, str):
            bad = SURROGATE.search(value)
            if bad:
                return _bad(where or None, f"{where or 'the body'} holds an unpaired surrogate "
                                           f"(\\u{ord(bad.group()):04x}), which is not valid Unicode; "
                                           "allowed: valid Unicode text (surrogates only in pairs)")
        elif isinstance(value, dict):
            for key in value:
                bad = SURROGATE.search(key)
                if bad:
                    return _bad(where or None, f"a key of {where or 'the body'} holds an unpaired surrogate "
                                               f"(\\u{ord(bad.group()):04x}), which is not valid Unicode")
            todo.extend((v, f"{where}.{k}" if where else k) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None


def _internal_error() -> ApiError:
    """What a caller learns of a failure herd did not expect: that it happened, nothing of its insides."""
    return ApiError(500, "herd failed to answer this request (an internal error, logged on the server); "
                         "retry it, and report it if it repeats", type_="server_error")


class _InternalErrors:
    """ASGI middleware: an exception no handler expected becomes OpenAI's 500 body (before the
    response started; after, the connection closes) and is logged and counted; the server goes on."""

    def __init__(self, app, count):
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except ClientDisconnect:  # the caller left while sending its body: nobody to answer, nothing wrong
            return
        except Exception:
            route = _route(scope.get("path", ""))
            log.exception("HTTP %s %s failed", scope.get("method"), route)
            self.count(route)
            if not started:
                await _internal_error().response()(scope, receive, send)


def _route(path: str) -> str:
    return path if path in ROUTES else "other"


def _call_route(call: Call) -> str:
    return "/v1/chat/completions" if call.kind == "chat" else "/v1/completions"


@dataclass
class Call:
    """One parsed request: the prompts, how to sample each choice, and what to report."""

    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice of each prompt (n of them)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    stream: bool = False
    include_usage: bool = False
    session_id: str = ""
    new_session: bool = False
    messages: list[dict] | None = None
    trace_routes: bool = False
    return_token_ids: bool = False
    prompt_tokens: int = 0
    image_blobs: list = field(default_factory=list)  # (bytes, media type) of a chat's image parts, in order
    images: tuple = ()  # decoded (llama4.vision.Image), set with the prompt's ids


class OpenAIFrontend:
    """OpenAI requests in, engine requests on the servicer's engine loop, OpenAI's shapes out."""

    def __init__(self, servicer, model_id: str):
        self.sv, self.model_id = servicer, model_id
        self.created = int(time.time())
        self.metrics = None  # attention_svc.metrics.AttentionMetrics, where internal errors are counted

    def count_internal_error(self, route: str) -> None:
        if self.metrics is not None:
            self.metrics.http_internal_errors.labels(route).inc()

    # ---- parsing ----
    def parse(self, body, kind: str) -> Call:
        if not isinstance(body, dict):
            raise _bad(None, "the request body must be a JSON object")
        known = (COMPLETION if kind == "completion" else CHAT) | HERD
        for name in body:
            if name not in known:
                raise _bad(name, f"Unrecognized request argument supplied: {name}")
        for name, neutral in NEUTRAL.items():
            if body.get(name) is not None and body[name] not in neutral and name in known:
                raise _bad(name, f"{name}={json.dumps(body[name])[:40]} is not supported by herd; "
                                 f"allowed: {', '.join(json.dumps(v) for v in neutral) or 'null'}")
        model = _typed(body, "model", (str,), None, "a model id from /v1/models")
        if model is None:
            raise _bad("model", "model is required; allowed: a model id from /v1/models")
        if model != self.model_id:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_id}`",
                           "model", code="model_not_found")
        call = Call(kind=kind, prompts=[], params=[])
        call.session_id = _typed(body, "session_id", (str,), "", "a string")
        if len(call.session_id) > MAX_LABEL_CHARS:
            raise _bad("session_id", f"session_id is {len(call.session_id)} characters; allowed: at most "
                                     f"{MAX_LABEL_CHARS}")
        call.new_session = _typed(body, "new_session", (bool,), False, "true or false")
        call.trace_routes = _typed(body, "trace_routes", (bool,), False, "true or false")
        call.return_token_ids = _typed(body, "return_token_ids", (bool,), False, "true or false")
        if kind == "chat":
            call.messages, call.image_blobs = self._messages(body)
            if call.image_blobs and call.session_id:
                raise _bad("session_id", "images in a session are not supported yet; allowed: images without "
                                         "session_id")
            call.prompts = [call.messages]  # rendered below (a session prepends its history)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            want_logprobs = _typed(body, "logprobs", (bool,), False, "true or false")
            top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS["chat"], integer=True)
            if top and not want_logprobs:
                raise _bad("top_logprobs", "top_logprobs needs logprobs=true")
            call.logprobs = top if want_logprobs else None
        else:
            call.prompts = self._prompts(body.get("prompt"))
            max_tokens, name = body.get("max_tokens"), "max_tokens"
            call.logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS["completion"], integer=True)
        default_tokens = COMPLETION_MAX_TOKENS if kind == "completion" else self.sv.default_max_tokens
        max_tokens = _number({name: max_tokens}, name, default_tokens, 1, 2**31 - 1, integer=True)
        n = _number(body, "n", 1, 1, MAX_N, integer=True)
        if n * len(call.prompts) > MAX_CHOICES:  # every choice is a sequence in the shared engine queue
            raise _bad("n", f"{len(call.prompts)} prompts x n={n} = {n * len(call.prompts)} choices; allowed: at "
                            f"most {MAX_CHOICES} per request")
        if call.session_id and (n > 1 or len(call.prompts) > 1):
            raise _bad("n", "a session continues one conversation; allowed: n=1 and one prompt with session_id")
        if call.new_session and not call.session_id:
            raise _bad("new_session", "new_session needs a session_id")
        temperature = _number(body, "temperature", 1.0, 0, 2)
        top_p = _number(body, "top_p", 1.0, 0, 1)
        if top_p == 0:
            raise _bad("top_p", "top_p=0 is invalid; allowed: a number in (0, 1]")
        seed = _number(body, "seed", None, 0, 2**63 - 1 - MAX_N, integer=True)
        top_k = _number(body, "top_k", 0, 0, self.sv.cfg.vocab_size, integer=True)
        ignore_eos = _typed(body, "ignore_eos", (bool,), False, "true or false")
        stop_ids = list(_typed(body, "stop_token_ids", (list,), [], "a list of token ids"))
        call.stop = self._stop(body.get("stop"), stop_ids)
        for t in stop_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.sv.cfg.vocab_size:
                raise _bad("stop_token_ids",
                           f"stop token {t!r} is invalid; allowed: ids in [0, {self.sv.cfg.vocab_size})")
        call.stream = _typed(body, "stream", (bool,), False, "true or false")
        options = _typed(body, "stream_options", (dict,), {}, "an object")
        if options and not call.stream:
            raise _bad("stream_options", "stream_options needs stream=true")
        call.include_usage = bool(options.get("include_usage", False))
        for _ in call.prompts:
            for i in range(n):
                call.params.append(SamplingParams(
                    max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=None if seed is None else seed + i,  # n choices differ, and a seed repeats all of them
                    stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos))
        return call

    def _messages(self, body) -> tuple[list[dict], list[tuple[bytes, str]]]:
        """The messages (content a string, or text and image parts) and the images' bytes in order."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "messages must be a non-empty list of {role, content}")
        out, images = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a string role")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    where = f"messages[{i}].content[{j}]"
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text" and isinstance(part.get("text"), str):
                        parts.append({"type": "text", "text": part["text"]})
                    elif kind == "image_url":
                        images.append(_data_url(part.get("image_url"), where))
                        parts.append({"type": "image"})
                    else:
                        raise _bad(where, f"{where} is not supported; allowed: {{type: text, text}} or "
                                          "{type: image_url, image_url: {url: data:image/png;base64,...}}")
                content = parts
            elif not isinstance(content, str):
                raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or content parts")
            out.append({"role": m["role"], "content": content})
        return out, images

    def _prompts(self, prompt) -> list[list[int]]:
        """str, [str], [int] or [[int]]: one or more prompts."""
        vocab = self.sv.cfg.vocab_size

        def ids(p, where):
            if isinstance(p, str):
                if not p:
                    raise _bad("prompt", f"{where} is empty; allowed: a non-empty prompt")
                return self.sv.tok.encode(p, add_bos=True)
            if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise _bad("prompt", f"{where} holds token {bad[0]}; allowed: ids in [0, {vocab})")
                return list(p)
            raise _bad("prompt", f"{where} is invalid; allowed: a string, a list of strings, token ids, "
                                 "or a list of token id lists")

        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return [ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        return [ids(prompt, "prompt")]

    def _stop(self, stop, stop_ids: list) -> list[str]:
        items = [stop] if isinstance(stop, str) else (stop if stop is not None else [])
        if not isinstance(items, list) or len(items) > MAX_STOP:
            raise _bad("stop", f"stop must be a string or a list of at most {MAX_STOP} strings (or token ids)")
        strings = []
        for s in items:
            if isinstance(s, int) and not isinstance(s, bool):
                stop_ids.append(s)  # a token id in stop: herd accepts both
            elif isinstance(s, str) and s:
                strings.append(s)
            else:
                raise _bad("stop", f"stop entry {json.dumps(s)[:40]} is invalid; "
                                   "allowed: non-empty strings or token ids")
        return strings

    # ---- running ----
    def _prompt_ids(self, call: Call):
        """The prompts' ids; with a session, its history first (chat re-renders the conversation)."""
        if not call.session_id:
            if call.kind == "chat":
                ids, call.images = with_images(self.sv.tok.apply_chat(call.messages), call.image_blobs,
                                               self.sv.loop.engine.model.vision, self.sv.special_id,
                                               self.sv.max_images, self.sv.images)
                return [ids], None
            return call.prompts, None
        if self.sv.sessions is None:
            raise _bad("session_id", "session_id needs the Redis KV tier, which this server runs without")
        past = self.sv.sessions.read(call.session_id, new=call.new_session)
        if call.kind == "chat":
            if past.tokens and past.messages is None:
                raise _bad("session_id", f"session {call.session_id!r} holds a token history; continue it with "
                                         "/v1/completions")
            call.messages = (past.messages or []) + call.messages
            return [self.sv.tok.apply_chat(call.messages)], past
        if past.messages is not None:
            raise _bad("session_id", f"session {call.session_id!r} is a chat; continue it with /v1/chat/completions")
        turn = call.prompts[0][1:] if past.tokens and call.prompts[0][:1] == [self.sv.tok.bos_id] else call.prompts[0]
        return [past.tokens + turn], past

    def submit(self, call: Call) -> tuple[list[_Choice], object]:
        prompts, session = self._prompt_ids(call)
        call.prompt_tokens = sum(len(ids) for ids in prompts)
        n = len(call.params) // len(prompts)
        aio = asyncio.get_running_loop()
        requests = [EngineRequest(ids, call.params[p * n + j], request_id=uuid.uuid4().hex,
                                  trace_routes=call.trace_routes, top_logprobs=call.logprobs or 0, images=call.images)
                    for p, ids in enumerate(prompts) for j in range(n)]
        sinks = [_Sink(aio) for _ in requests]
        lives = self.sv.loop.submit_group(requests, sinks)
        return [_Choice(i, self, sink, live, call) for i, (sink, live) in enumerate(zip(sinks, lives, strict=True))], \
            session


class _Sink:
    """Where the engine thread puts a request's events: onto an asyncio queue, thread-safely."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, ev) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)


class _Choice:
    """One choice being generated: its events, text with stop strings held back, logprobs, finish."""

    def __init__(self, index: int, front: OpenAIFrontend, sink: _Sink, live, call: Call):
        self.index, self.front, self.sink, self.live, self.call = index, front, sink, live, call
        self.detok = Detokenizer(front.sv.tok)
        self.pending = ""  # text that may still turn out to start a stop string
        self.hold = max((len(s) for s in call.stop), default=1) - 1
        self.finish_reason: str | None = None
        self.seq = None
        self.tokens: list[int] = []

    async def next(self) -> tuple[str, list, list]:
        """The next piece: (text, [(token, logprob, top)], routes). Raises ApiError on failure."""
        ev = await self.sink.queue.get()
        if isinstance(ev, HerdInputError):  # the engine's checks: "field=value is invalid; allowed: ..."
            message = str(ev)
            head = message.split(" ", 1)[0]
            raise _bad(head.split("=", 1)[0] if "=" in head else None, message)
        if isinstance(ev, QueueFull):
            raise ApiError(429, str(ev), type_="rate_limit_error")
        if ev is ABORTED:
            raise ApiError(499, "request aborted", type_="server_error")
        # A failed step's own text can name internals (an RpcError carries the router's address):
        # it goes to the log, the caller gets what happened and what to do.
        if isinstance(ev, Exception):
            log.warning("model step failed: %s", ev)
            raise ApiError(503, "a model step failed; retry the request", type_="server_error")
        self.seq = ev.seq
        if ev.seq.finish_reason == "error":
            log.warning("request failed: %s", ev.seq.error)
            if ev.seq.retryable:
                raise ApiError(503, "a model step failed; retry the request", type_="server_error")
            self.front.count_internal_error(_call_route(self.call))
            raise _internal_error()
        text, toks, routes = "", [], []
        if ev.token is not None:
            self.tokens.append(ev.token)
            toks.append((ev.token, ev.logprob, ev.top or []))
            routes.append([list(hop) for hop in ev.route or ()])
            text = self._text(self.detok.push(ev.token))
        if ev.seq.finished and self.finish_reason is None:
            self.finish_reason = ev.seq.finish_reason
            text += self.pending
            self.pending = ""
        return text, toks, routes

    def _text(self, delta: str) -> str:
        if not self.call.stop:
            return delta
        self.pending += delta
        hits = [(self.pending.find(s), s) for s in self.call.stop if s in self.pending]
        if hits:
            at = min(hits)[0]
            out, self.pending = self.pending[:at], ""
            self.finish_reason = "stop"
            self.front.sv.loop.abort(self.live, "stop")  # the rest of the sequence is not wanted
            return out
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def abort(self) -> None:
        if not self.done:
            self.front.sv.loop.abort(self.live)


def _data_url(image_url, where: str) -> tuple[bytes, str]:
    """{url: "data:image/png;base64,..."} -> (bytes, media type). Only data: URLs: herd fetches nothing."""
    import base64
    import binascii

    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise _bad(where, f"{where}.image_url.url must be a data: URL (data:image/png;base64,...); "
                          "herd does not fetch images")
    media_type, payload = url[len("data:"):].split(";base64,", 1)
    if len(payload) > MAX_BODY_BYTES:
        raise ApiError(413, f"{where}: the image is over {MAX_BODY_BYTES} bytes")
    try:
        return base64.b64decode(payload, validate=True), media_type
    except (binascii.Error, ValueError):
        raise _bad(where, f"{where}.image_url.url is not valid base64") from None


def _token_text(tok, token: int) -> str:
    return tok.detokenize([token], skip_special=False)


def _logprobs(front: OpenAIFrontend, call: Call, toks: list, offset: int) -> dict | None:
    if call.logprobs is None:
        return None
    tok = front.sv.tok
    if call.kind == "chat":
        return {"content": [{"token": _token_text(tok, t), "logprob": lp,
                             "bytes": list(_token_text(tok, t).encode()),
                             "top_logprobs": [{"token": _token_text(tok, a), "logprob": alp,
                                               "bytes": list(_token_text(tok, a).encode())} for a, alp in top]}
                            for t, lp, top in toks]}
    texts = [_token_text(tok, t) for t, _, _ in toks]
    offsets, at = [], offset
    for s in texts:
        offsets.append(at)
        at += len(s)
    top = [{_token_text(tok, a): alp for a, alp in alts} for _, _, alts in toks] if call.logprobs else None
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in toks], "top_logprobs": top, "text_offset": offsets}


def create_app(servicer, model_id: str, api_keys: list[str] | None = None, cluster_token: str | None = None,
               metrics=None) -> FastAPI:
    """The HTTP app over the servicer's engine loop. With api_keys every route but /health needs
    `Authorization: Bearer <secret>`: an API key for /v1/*, an API key or the cluster token for
    /metrics (what operators and Prometheus read). The cluster token is no API key: /v1/* refuse it."""
    keys = list(api_keys or [])
    readers = [*keys, *([cluster_token] if cluster_token else [])]
    front = OpenAIFrontend(servicer, model_id)
    front.metrics = metrics
    app = FastAPI(title="herd", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        if keys and path != "/health":
            header = request.headers.get("authorization", "")
            given = header[len("Bearer "):] if header.startswith("Bearer ") else None
            if not matches(given, readers if path == "/metrics" else keys):
                what = "API key or cluster token" if path == "/metrics" else "API key"
                return ApiError(401, f"Incorrect {what} provided; send Authorization: Bearer <{what}>",
                                type_="invalid_request_error", code="invalid_api_key").response()
        return await call_next(request)

    app.add_middleware(_InternalErrors, count=front.count_internal_error)  # last added: outermost

    @app.get("/health")
    async def health():
        ready = servicer.readiness is None or not servicer.readiness.reason
        return Response(status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            return Response(status_code=404)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": front.created,
                                            "owned_by": "herd"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(front, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _handle(front, request, "chat")

    return app


async def _handle(front: OpenAIFrontend, request: Request, kind: str):
    readiness = front.sv.readiness
    if readiness is not None and readiness.reason.startswith("draining"):
        return ApiError(503, "the server is draining; retry on another replica", type_="server_error").response()
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            return ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes").response()
    try:
        body = json.loads(bytes(raw) or b"null")
    except ValueError as exc:
        return _bad(None, f"the request body is not JSON: {exc}").response()
    except RecursionError:
        return _bad(None, "the request body nests arrays or objects too deeply").response()
    invalid = _invalid_unicode(body)
    if invalid is not None:
        return invalid.response()
    try:
        call = front.parse(body, kind)
        choices, session = front.submit(call)
    except ApiError as exc:
        return exc.response()
    except HerdInputError as exc:
        return _bad(None, str(exc)).response()
    except SessionError as exc:
        return _session_error(exc).response()
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    if call.stream:
        return StreamingResponse(_stream(front, call, choices, session, rid), media_type="text/event-stream")
    return await _whole(front, call, choices, session, rid, request)


_SESSION_STATUS = {"NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "UNAVAILABLE": 503}


def _session_error(exc: SessionError) -> ApiError:
    status = _SESSION_STATUS.get(exc.status, 500)
    return ApiError(status, str(exc), "session_id", type_="invalid_request_error" if status < 500 else "server_error")


def _usage(call: Call, choices) -> dict:
    """Prompt tokens once per prompt (not per choice), as OpenAI counts them."""
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": completion,
            "total_tokens": call.prompt_tokens + completion}


def _commit(front: OpenAIFrontend, call: Call, choice: _Choice, session, text: str) -> None:
    if session is None:
        return
    answer = [{"role": "assistant", "content": text}]
    front.sv.sessions.commit(session, choice.seq.tokens[: choice.seq.num_prompt + len(choice.tokens)],
                             call.messages and call.messages + answer)


async def _whole(front, call, choices, session, rid, request: Request):
    texts = {c.index: "" for c in choices}
    toks = {c.index: [] for c in choices}
    routes = {c.index: [] for c in choices}
    try:
        for c in choices:
            while not c.done:
                try:
                    text, t, r = await asyncio.wait_for(c.next(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                texts[c.index] += text
                toks[c.index] += t
                routes[c.index] += r
        if session is not None:
            _commit(front, call, choices[0], session, texts[0])
    except ApiError as exc:
        return exc.response()
    except SessionError as exc:
        return _session_error(exc).response()
    finally:
        for c in choices:
            c.abort()
    out = []
    for c in choices:
        item = {"index": c.index, "logprobs": _logprobs(front, call, toks[c.index], 0),
                "finish_reason": c.finish_reason}
        if call.kind == "chat":
            item["message"] = {"role": "assistant", "content": texts[c.index]}
        else:
            item["text"] = texts[c.index]
        if call.trace_routes:
            item["routes"] = routes[c.index]  # per token: [[layer, expert, worker], ...]
        if call.return_token_ids:
            item["token_ids"] = [t for t, _, _ in toks[c.index]]
        out.append(item)
    return {"id": rid, "object": "chat.completion" if call.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": front.model_id, "choices": out, "usage": _usage(call, choices)}


async def _stream(front, call, choices, session, rid):
    obj = "chat.completion.chunk" if call.kind == "chat" else "text_completion"
    created = int(time.time())

    def chunk(choice: dict) -> str:
        payload = {"id": rid, "object": obj, "created": created, "model": front.model_id, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    offsets = {c.index: 0 for c in choices}
    answer, pending = "", {}
    try:
        if call.kind == "chat":
            for c in choices:
                yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        pending = {c.index: asyncio.ensure_future(c.next()) for c in choices}
        by_index = {c.index: c for c in choices}
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for index, task in list(pending.items()):
                if task not in done:
                    continue
                c = by_index[index]
                text, toks, routes = task.result()
                if index == 0:
                    answer += text
                piece = {"index": index, "logprobs": _logprobs(front, call, toks, offsets[index]),
                         "finish_reason": c.finish_reason}
                offsets[index] += len(text)
                if call.kind == "chat":
                    piece["delta"] = {"content": text} if text or not c.done else {}
                else:
                    piece["text"] = text
                if call.trace_routes:
                    piece["routes"] = routes
                if call.return_token_ids:
                    piece["token_ids"] = [t for t, _, _ in toks]
                if text or toks or c.done:
                    yield chunk(piece)
                if c.done:
                    del pending[index]
                else:
                    pending[index] = asyncio.ensure_future(c.next())
        if session is not None:
            _commit(front, call, choices[0], session, answer)
        if call.include_usage:
            payload = {"id": rid, "object": obj, "created": created, "model": front.model_id, "choices": [],
                       "usage": _usage(call, choices)}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    except (ApiError, SessionError) as exc:  # mid-stream: OpenAI's error shape, as an event
        err = exc if isinstance(exc, ApiError) else _session_error(exc)
        yield _event(err)
    except Exception:  # the status line is sent: the error can only be the stream's last event
        log.exception("HTTP stream of %s failed", rid)
        front.count_internal_error(_call_route(call))
        yield _event(_internal_error())
    finally:  # also on client disconnect (the task is cancelled): free every sequence
        for task in pending.values():
            task.cancel()
        for c in choices:
            c.abort()


def _event(err: ApiError) -> str:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return f"data: {json.dumps(body)}\n\n"


def serve_http(app: FastAPI, host: str, port: int, tls: tuple[str, str] | None = None):
    """uvicorn on its own thread in this process; returns (server, bound port). tls: (cert file, key file)."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30,
                            ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True).start()
    return server, sock.getsockname()[1]
