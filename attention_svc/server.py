"""The attention service: herd's public gRPC API over the continuous-batching engine.

Handlers turn prompts into token ids (tokenizer, chat template, sessions), hand requests to
the engine loop (attention_svc.engine_loop) and stream back what it produces. A bad request
is refused alone; a failed step fails only its requests.
"""
from __future__ import annotations

import logging
import queue
import threading
import uuid

import grpc
import redis
import torch

from attention_svc import DISPATCH_MODES
from attention_svc.direct_moe import DirectMoE
from attention_svc.engine_loop import ABORTED, EngineLoop
from attention_svc.health import Readiness
from attention_svc.kv_tier import RedisKVTier
from attention_svc.metrics import AttentionMetrics
from attention_svc.remote_moe import RemoteMoE
from attention_svc.sessions import Session, SessionError, SessionStore
from herdpb import llama_pb2, llama_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, QueueFull, Request
from llama4.errors import HerdInputError, need
from llama4.images import MAX_IMAGES, ImageProcessor, with_images
from llama4.kv_cache import DEFAULT_BLOCK_SIZE
from llama4.model import Llama4Model
from llama4.quant import serving_fingerprint
from llama4.sampling import SamplingParams
from llama4.tokenizer import Detokenizer, Tokenizer
from llama4.vision import Image
from llama4.weights import DenseWeights, load_vision
from plumbing.auth import bearer, matches
from plumbing.grpc_server import MAX_MESSAGE_BYTES, start_server

log = logging.getLogger("herd.attention")
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_STREAMS = 256
MAX_LABEL_CHARS = 256  # request_id and session_id: client-chosen, so bounded before they reach logs or Redis keys
HEALTH_THREADS = 16  # server threads beyond the stream limit: health, Status, Tokenize
STATUS_METHOD = "/herd.v1.Llama/Status"  # the one public method the cluster token also opens (herd status)


class LlamaServicer(llama_pb2_grpc.LlamaServicer):
    def __init__(self, model_name: str, loop: EngineLoop, tokenizer: Tokenizer, moe: RemoteMoE | DirectMoE | None,
                 kv_tier: RedisKVTier | None = None, sessions: SessionStore | None = None):
        self.model_name, self.loop, self.tok, self.moe, self.kv_tier = model_name, loop, tokenizer, moe, kv_tier
        self.sessions = sessions
        self.cfg = loop.engine.cfg
        self.default_max_tokens = min(DEFAULT_MAX_TOKENS, loop.engine.max_new_tokens or DEFAULT_MAX_TOKENS)
        # Who sees internal paths and addresses in Status: None = every caller (no auth), else only
        # callers sending one of these (the cluster token; none at all when only API keys are set).
        self.operators: list[str] | None = None
        self.streams = threading.BoundedSemaphore(DEFAULT_MAX_STREAMS)  # Generate/Score at once (serve() sets it)
        self.readiness: Readiness | None = None
        vision = loop.engine.model.vision
        self.images = ImageProcessor.from_checkpoint(model_name, vision.cfg) if vision is not None else None
        self.max_images = MAX_IMAGES

    # ---- input at the edge ----
    def _ids(self, which: str, msg, add_bos: bool = True) -> list[int]:
        return self._prompt(which, msg, add_bos)[0]

    def _prompt(self, which: str, msg, add_bos: bool = True) -> tuple[list[int], tuple[Image, ...]]:
        """The prompt's ids, with each <|image|> placeholder expanded, and its decoded images."""
        parts = list(getattr(msg, "images", ()))
        if which == "text":
            if not msg.text:
                raise HerdInputError("text is empty; allowed: a non-empty prompt")
            ids = self.tok.encode(msg.text, add_bos=add_bos)
        elif which == "ids":
            ids = list(msg.ids.ids)
        elif which == "chat":
            if parts:
                raise HerdInputError("images is set with a chat prompt; allowed: images as parts of the messages")
            messages, parts = _messages(msg.chat)
            ids = self.tok.apply_chat(messages)
        else:
            raise HerdInputError("prompt is missing; allowed: one of text, ids, chat")
        return with_images(ids, [(p.data, p.media_type) for p in parts], self.loop.engine.model.vision,
                           self.special_id, self.max_images, self.images)

    def special_id(self, name: str) -> int:
        token = self.tok.token_to_id(name)
        if token is None:
            raise HerdInputError(f"this tokenizer has no {name} token; allowed: text prompts")
        return token

    def _params(self, p: llama_pb2.SamplingParams) -> SamplingParams:
        """The request's sampling parameters; the engine checks them (Engine.validate)."""
        return SamplingParams(max_tokens=p.max_tokens or self.default_max_tokens, temperature=p.temperature,
                              top_p=p.top_p or 1.0, top_k=p.top_k, seed=p.seed if p.HasField("seed") else None,
                              stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos)

    def _run(self, request: Request, context):
        """Submit to the engine and yield TokenEvents until the sequence finishes. At most
        max_streams run at once, so threads stay free for health checks and Status."""
        if not self.streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent Generate/Score calls; retry later")
        try:
            yield from self._events(request, context)
        finally:
            self.streams.release()

    def _events(self, request: Request, context):
        live = self.loop.submit(request)
        context.add_callback(lambda: self.loop.abort(live))  # cancel, disconnect, deadline
        while True:
            try:
                ev = live.events.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(ev, HerdInputError):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(ev))
            if isinstance(ev, QueueFull):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(ev))
            if ev is ABORTED:
                context.abort(grpc.StatusCode.CANCELLED, "request aborted")
            if isinstance(ev, Exception):
                context.abort(grpc.StatusCode.UNAVAILABLE, f"model step failed: {ev}")
            if ev.seq.finish_reason == "error":
                code = grpc.StatusCode.UNAVAILABLE if ev.seq.retryable else grpc.StatusCode.INTERNAL
                context.abort(code, ev.seq.error)
            yield ev
            if ev.seq.finished:
                return

    # ---- the API ----
    def _session_prompt(self, request) -> tuple[list[int], list[dict] | None, Session]:
        """Prompt ids of this turn, for chat sessions the conversation's messages, and the
        session as read (its version is what the turn's commit compares against).

        A chat session re-renders the whole conversation with the template, so its KV comes
        from Redis up to the first token that differs. A text or ids session appends the
        turn's tokens to the session's tokens."""
        which = request.WhichOneof("prompt")
        if request.images or (which == "chat" and any(m.parts for m in request.chat.messages)):
            raise HerdInputError("images in a session are not supported yet; allowed: images without session_id")
        past = self.sessions.read(request.session_id, new=request.new_session)
        if which == "chat":
            if past.tokens and past.messages is None:
                raise HerdInputError(f"session {request.session_id!r} holds a token history; "
                                     "continue it with text or ids")
            messages = (past.messages or []) + _messages(request.chat)[0]
            return self.tok.apply_chat(messages), messages, past
        return past.tokens + self._ids(which, request, add_bos=not past.tokens), None, past

    def Generate(self, request, context):
        messages, session, images = None, None, ()
        try:
            for name in ("request_id", "session_id"):
                value = getattr(request, name)
                need(len(value) <= MAX_LABEL_CHARS, name, value[:32] + "...", f"at most {MAX_LABEL_CHARS} characters")
            if request.session_id:
                if self.sessions is None:
                    raise HerdInputError("session_id needs the Redis KV tier, which this server runs without")
                ids, messages, session = self._session_prompt(request)
            elif request.new_session:
                raise HerdInputError("new_session is set without a session_id; allowed: new_session with a session_id")
            else:
                ids, images = self._prompt(request.WhichOneof("prompt"), request)
            params = self._params(request.sampling)
        except HerdInputError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SessionError as exc:
            context.abort(grpc.StatusCode[exc.status], str(exc))
        req = Request(ids, params, request_id=request.request_id or uuid.uuid4().hex, trace_routes=request.trace_routes,
                      images=images)
        detok = Detokenizer(self.tok)
        for ev in self._run(req, context):
            out = llama_pb2.GenerateResponse()
            if ev.token is not None:
                out.token_ids.append(ev.token)
                out.logprobs.append(ev.logprob)
                out.text = detok.push(ev.token)
                for layer, expert, worker in ev.route or ():
                    out.route.add(layer=layer, expert=expert, worker=worker)
            if ev.seq.finished:
                out.finish_reason = ev.seq.finish_reason
                out.usage.prompt_tokens = ev.seq.num_prompt
                out.usage.completion_tokens = len(ev.seq.output_ids)
                if session is not None:  # commit before the final message: a lost turn must not look done
                    answer = [{"role": "assistant", "content": self.tok.detokenize(ev.seq.output_ids)}]
                    try:
                        self.sessions.commit(session, ev.seq.tokens, messages and messages + answer)
                    except SessionError as exc:
                        context.abort(grpc.StatusCode[exc.status], str(exc))
            yield out

    def Score(self, request, context):
        try:
            ids, images = self._prompt(request.WhichOneof("input"), request)
        except HerdInputError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        req = Request(ids, SamplingParams(max_tokens=0), request_id=uuid.uuid4().hex, prompt_logprobs=True,
                      images=images)
        seq = None
        for ev in self._run(req, context):
            seq = ev.seq
        return llama_pb2.ScoreResponse(ids=ids, logprobs=seq.prompt_logprobs[1:])

    def Tokenize(self, request, context):
        try:
            return llama_pb2.TokenizeResponse(ids=self._ids(request.WhichOneof("input"), request))
        except HerdInputError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def Status(self, request, context):
        out = llama_pb2.ClusterStatus(model=self.model_name, steps=self.loop.steps,
                                      tokens_computed=self.loop.engine.tokens_computed,
                                      recent_batch_sizes=list(self.loop.recent_batch_sizes),
                                      running=len(self.loop.engine.running), waiting=len(self.loop.engine.waiting))
        if self.kv_tier is not None:
            st = self.kv_tier.stats
            out.kv_tier.CopyFrom(llama_pb2.KVTierStatus(
                enabled=True, hits=st.hits, misses=st.misses, tokens_loaded=st.tokens_loaded, bytes_read=st.bytes_read,
                bytes_written=st.bytes_written, load_seconds=st.load_seconds, corrupt=st.corrupt, errors=st.errors))
        if self.moe is not None:
            out.route_rpcs, out.dispatch = self.moe.route_rpcs, self.moe.dispatch
            if isinstance(self.moe, DirectMoE):
                out.placement_version = self.moe.placement.version
            try:
                out.router.CopyFrom(self.moe.router_status())
            except grpc.RpcError as exc:
                log.warning("router status unavailable: %s", exc.code())
        if self.operators is not None and not matches(bearer(context.invocation_metadata()), self.operators):
            out.model = "(operators only)"  # internal paths and addresses are for the operator
            for w in out.router.workers:
                w.address, w.refused, w.node_id, w.node_ip = "", "refused" if w.refused else "", "", ""
        return out


def _messages(chat: llama_pb2.ChatMessages) -> tuple[list[dict], list[llama_pb2.ImagePart]]:
    """The messages (content a string, or text and image parts in order) and their images in order."""
    if not chat.messages:
        raise HerdInputError("chat.messages is empty; allowed: at least one message")
    messages, images = [], []
    for i, m in enumerate(chat.messages):
        if not m.parts:
            messages.append({"role": m.role, "content": m.content})
            continue
        if m.content:
            raise HerdInputError(f"chat.messages[{i}] has both content and parts; allowed: one of them")
        parts = []
        for part in m.parts:
            if part.WhichOneof("part") == "image":
                parts.append({"type": "image"})
                images.append(part.image)
            else:
                parts.append({"type": "text", "text": part.text})
        messages.append({"role": m.role, "content": parts})
    return messages, images


def build(model_path: str, router_address: str | None, dtype: torch.dtype, device: str, batching: dict,
          route_timeout: float = 60.0, redis_url: str | None = None, kv_ttl_s: int = 3600,
          max_message_bytes: int = MAX_MESSAGE_BYTES, state_redis_url: str | None = None,
          cluster_token: str | None = None, expert_dtype: str = "auto",
          dispatch: str = "router") -> tuple[LlamaServicer, RemoteMoE | DirectMoE | None]:
    """redis_url: the KV tier's cache; state_redis_url: sessions (default: redis_url).
    cluster_token: sent to the router (and, dispatch: direct, to the workers). The router must serve the
    same model (fingerprint), experts held as expert_dtype (llama4.quant): KV computed with other experts
    is another model's KV. dispatch: "router" (each MoE layer's rows go to the router, RemoteMoE) or
    "direct" (gated here and sent to the workers, with the router's pushed table: DirectMoE)."""
    need(dispatch in DISPATCH_MODES, "dispatch", dispatch, " or ".join(DISPATCH_MODES))
    ckpt = Checkpoint(model_path)
    ours = serving_fingerprint(ckpt.fingerprint(), expert_dtype, ckpt.stored_fp8)
    moe = None
    if router_address and dispatch == "direct":
        moe = DirectMoE(ckpt, router_address, dtype, ours, route_timeout, max_message_bytes, cluster_token)
    elif router_address:
        moe = RemoteMoE(router_address, route_timeout, max_message_bytes, cluster_token)
    if moe is not None:
        theirs = moe.router_status().fingerprint
        if theirs != ours:
            raise HerdInputError(f"router at {router_address} serves model {theirs or 'unknown'}; "
                                 f"this attention service loaded model {ours} from {model_path}")
    if moe is None:
        model = Llama4Model.load(ckpt, dtype, device, expert_dtype=expert_dtype)
    else:
        # The vision tower is dense: it runs here, beside attention; image tokens then travel as tokens.
        model = Llama4Model(ckpt.config, DenseWeights.load(ckpt, dtype, device), moe, dtype, device,
                            load_vision(ckpt, dtype, device), ckpt.image_token_id)
    tier, sessions = None, None
    if redis_url:
        fingerprint = ours
        tier = RedisKVTier(redis_url, fingerprint, ckpt.config, dtype,
                           batching.get("block_size", DEFAULT_BLOCK_SIZE), ttl_s=kv_ttl_s)
        state = redis.Redis.from_url(state_redis_url, socket_timeout=1.0, socket_connect_timeout=1.0) \
            if state_redis_url else tier.redis  # sessions belong with state (never evicted), not the LRU cache
        sessions = SessionStore(state, fingerprint, ttl_s=kv_ttl_s)
    engine = Engine(model, kv_tier=tier, **batching)
    tok = Tokenizer.for_checkpoint(model_path, ckpt.config.eos_token_id)
    loop = EngineLoop(engine)
    loop.metrics = AttentionMetrics(loop, tier)
    return LlamaServicer(model_path, loop, tok, moe, tier, sessions), moe


def serve(servicer: LlamaServicer, host: str = "127.0.0.1", port: int = 0, max_message_bytes: int = MAX_MESSAGE_BYTES,
          max_streams: int = DEFAULT_MAX_STREAMS, api_keys: list[str] | None = None, cluster_token: str | None = None,
          tls: tuple[bytes, bytes] | None = None):
    """Serve the public API. With api_keys, every call but health needs one of them; Status also
    opens to the cluster token, and only the cluster token sees its internal paths and addresses
    (`herd status`). The cluster token opens nothing else here: it is the services' credential,
    not an API key. Threads: max_streams for Generate/Score plus HEALTH_THREADS that health
    checks and Status never wait behind."""
    api_keys = list(api_keys or [])
    tokens = [cluster_token] if cluster_token else []
    servicer.operators = tokens if tokens or api_keys else None
    methods = {STATUS_METHOD: ([*api_keys, *tokens], "API key or cluster token")}
    servicer.streams = threading.BoundedSemaphore(max_streams)
    server, bound, health = start_server(lambda s: llama_pb2_grpc.add_LlamaServicer_to_server(servicer, s),
                                         ["herd.v1.Llama"], host=host, port=port,
                                         max_workers=max_streams + HEALTH_THREADS, max_message_bytes=max_message_bytes,
                                         secrets=api_keys or None, tls=tls, methods=methods)
    moe = servicer.moe
    servicer.readiness = Readiness(servicer.loop, moe.channel if moe else None, health, ["herd.v1.Llama"],
                                   moe.not_ready if isinstance(moe, DirectMoE) else None)
    servicer.readiness.watch()
    return server, bound
