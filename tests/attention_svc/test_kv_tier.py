"""The Redis KV tier against a real redis-server: prefix reuse, corruption, outages, sessions."""
import shutil

import grpc
import pytest
import redis as redis_lib
import torch

from attention_svc.kv_tier import RedisKVTier
from attention_svc.server import build, serve
from herd.redis_server import RedisServer
from herdpb import llama_pb2, llama_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from plumbing.grpc_server import channel


@pytest.fixture(scope="module")
def scout(reference_models):
    path = reference_models["tiny-scout"][1]
    return path, Llama4Model.load(Checkpoint(path))


def tokens(n, seed):
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_with_tier(model, path, url, max_step_tokens=4096):
    tier = RedisKVTier(url, Checkpoint(path).fingerprint(), model.cfg, model.dtype)
    return Engine(model, max_step_tokens=max_step_tokens, kv_tier=tier)


def run(engine, prompt, max_tokens=12):
    return engine.run([Request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))])[0]


def test_shared_prefix_is_loaded_not_recomputed(scout, redis_server):
    path, model = scout
    prefix = tokens(1024, 1)
    first, second = prefix + tokens(37, 2), prefix + tokens(30, 3)
    reference = run(Engine(model), second)
    warm = engine_with_tier(model, path, redis_server.url)
    run(warm, first)
    before = warm.tokens_computed
    got = run(warm, second)
    assert got.num_cached == 1024
    assert warm.tokens_computed - before == 30 + 11  # the uncached tail, then 11 decode steps
    assert got.output_ids == reference.output_ids
    assert max(abs(a - b) for a, b in zip(got.output_logprobs, reference.output_logprobs, strict=True)) <= 1e-5
    # A fresh engine (a restart, or another replica) finds the same prefix.
    other = engine_with_tier(model, path, redis_server.url)
    again = run(other, second)
    assert again.num_cached == 1024 + 16 and again.output_ids == reference.output_ids
    stats = other.kv_tier.stats
    assert stats.hits == 1 and stats.bytes_read > 0 and stats.corrupt == 0


def test_chunked_layers_load_only_the_current_chunk(scout, redis_server):
    path, model = scout
    engine = engine_with_tier(model, path, redis_server.url)
    prompt = tokens(200, 4)
    run(engine, prompt, max_tokens=1)
    r = redis_lib.Redis.from_url(redis_server.url)
    assert len(list(r.scan_iter("herd:kv:*:chunked"))) == 200 // 16  # every block is stored once
    other = engine_with_tier(model, path, redis_server.url)
    seq = run(other, prompt + [5], max_tokens=1)
    chunk, bs, p = model.cfg.attention_chunk_size, 16, seq.num_cached
    assert p == 192
    full_size = len(r.get(next(r.scan_iter("herd:kv:*:full"))))
    chunked_size = len(r.get(next(r.scan_iter("herd:kv:*:chunked"))))
    chunked_read = p // bs - (p - p % chunk) // bs  # blocks of the chunk that holds position p
    assert other.kv_tier.stats.bytes_read == (p // bs) * full_size + chunked_read * chunked_size
    assert other.kv_tier.stats.bytes_read < (p // bs) * (full_size + chunked_size) / 2


def test_corrupt_entry_is_detected_deleted_and_recomputed(scout, redis_server):
    path, model = scout
    prompt = tokens(160, 5)
    reference = run(Engine(model), prompt)
    engine = engine_with_tier(model, path, redis_server.url)
    run(engine, prompt)
    r = redis_lib.Redis.from_url(redis_server.url)
    other = engine_with_tier(model, path, redis_server.url)
    probe = other.add(Request(prompt))
    victim = RedisKVTier.key(other.cache.block_hashes(probe.id, probe.tokens, 5)[4], "full")
    other.waiting.clear()
    raw = bytearray(r.get(victim))
    raw[-3] ^= 0xFF
    r.set(victim, bytes(raw))
    got = run(other, prompt)
    assert got.output_ids == reference.output_ids
    assert other.kv_tier.stats.corrupt == 1 and got.num_cached <= 4 * 16
    assert r.get(victim) is None or bytes(r.get(victim)) != bytes(raw)  # deleted (then stored afresh)


def test_redis_outage_falls_back_to_recompute_and_recovers(scout, redis_server):
    path, model = scout
    prompt = tokens(100, 6)
    reference = run(Engine(model), prompt)
    engine = engine_with_tier(model, path, redis_server.url, max_step_tokens=32)
    port, password = redis_server.port, redis_server.password
    seq = engine.add(Request(prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
    engine.step()
    engine.step()  # two prefill chunks computed and stored
    assert engine.kv_tier.stats.bytes_written > 0
    redis_server.stop()  # Redis dies in the middle of the request
    while engine.has_work:
        engine.step()
    assert seq.output_ids == reference.output_ids
    assert engine.kv_tier.stats.errors >= 1
    revived = RedisServer(port=port, password=password)
    try:
        engine.kv_tier._down_until = 0  # skip the back-off wait
        run(engine, prompt)
        assert run(engine, prompt).num_cached > 0  # reconnected: stores and loads again
    finally:
        revived.stop()


def test_two_models_never_share_entries(reference_models, tmp_path, redis_server):
    path = reference_models["tiny-scout"][1]
    other_path = tmp_path / "other"
    shutil.copytree(path, other_path)
    from safetensors.torch import load_file, save_file

    t = load_file(other_path / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"] * 1.5
    save_file(t, other_path / "model.safetensors")
    a, b = Llama4Model.load(Checkpoint(path)), Llama4Model.load(Checkpoint(other_path))
    prompt = tokens(120, 7)
    run(engine_with_tier(a, path, redis_server.url), prompt)
    eb = engine_with_tier(b, other_path, redis_server.url)
    assert run(eb, prompt).num_cached == 0 and eb.kv_tier.stats.misses == 1


def test_session_resumes_on_a_restarted_attention_service(scout, redis_server):
    path, model = scout
    turn1, turn2 = tokens(70, 8), tokens(25, 9)
    out1 = run(Engine(model), turn1, max_tokens=10)
    expected = run(Engine(model), out1.tokens + turn2, max_tokens=10)

    def serve_once(ids, new_session=False):
        return serve_turn(path, redis_server.url, llama_pb2.GenerateRequest(
            session_id="conv-1", new_session=new_session, ids=llama_pb2.TokenIds(ids=ids)))

    got1, _ = serve_once(turn1, new_session=True)
    assert got1 == out1.output_ids
    got2, status = serve_once(turn2)  # a new service process state: nothing in memory
    assert got2 == expected.output_ids
    history = len(out1.tokens)
    assert status.kv_tier.hits == 1
    assert status.tokens_computed == len(out1.tokens) + len(turn2) - (history - 1) // 16 * 16 + 9


def serve_turn(path, url, req, max_tokens=10):
    """One Generate on a freshly started attention service (nothing in memory from before)."""
    servicer, _ = build(str(path), None, torch.float32, "cpu", {}, redis_url=url)
    server, port = serve(servicer)
    try:
        stub = llama_pb2_grpc.LlamaStub(channel(f"127.0.0.1:{port}"))
        req.sampling.max_tokens, req.sampling.ignore_eos = max_tokens, True
        got = [t for msg in stub.Generate(req, timeout=120) for t in msg.token_ids]
        return got, stub.Status(llama_pb2.StatusRequest(), timeout=10)
    finally:
        server.stop(0)


def test_chat_session_rerenders_the_conversation_and_reuses_its_kv(herd_home, redis_server):
    from llama4.store import DEFAULT_MODEL, resolve_model
    from llama4.tokenizer import Tokenizer

    path = resolve_model(DEFAULT_MODEL)  # a real chat model: its tokenizer and template
    model, tok = Llama4Model.load(Checkpoint(path)), Tokenizer.for_checkpoint(path)
    chat = lambda text: llama_pb2.ChatMessages(messages=[llama_pb2.ChatMessage(role="user", content=text)])
    first = "Tell me a long story about a llama who climbs the Andes and meets a condor at dawn."
    got1, _ = serve_turn(path, redis_server.url,
                         llama_pb2.GenerateRequest(session_id="c", new_session=True, chat=chat(first)), 24)
    answer = tok.detokenize(got1)
    conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": "And then?"}]
    ids = tok.apply_chat(conversation)
    expected = run(Engine(model), ids, max_tokens=10)
    got2, status = serve_turn(path, redis_server.url, llama_pb2.GenerateRequest(session_id="c", chat=chat("And then?")))
    assert got2 == expected.output_ids
    assert status.kv_tier.hits == 1
    assert status.tokens_computed <= len(ids) - 32 + 9  # at least the first turn's prompt blocks came from Redis
    bad = llama_pb2.GenerateRequest(session_id="conv-tokens", new_session=True, ids=llama_pb2.TokenIds(ids=[1, 2, 3]))
    serve_turn(path, redis_server.url, bad, 2)
    with pytest.raises(grpc.RpcError) as err:
        serve_turn(path, redis_server.url, llama_pb2.GenerateRequest(session_id="conv-tokens", chat=chat("hi")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token history" in err.value.details()


def test_kv_blocks_holding_an_image_are_shared_only_with_the_same_image(multimodal, redis_server):
    """Same token ids, other pixels: the blocks from the image on are another prompt's."""
    from conftest import PATCH_ID

    from llama4.vision import Image, image_prompt

    path = multimodal[1]
    model = Llama4Model.load(Checkpoint(path))
    layout = image_prompt(1, 1, model.vision.cfg.tokens_per_tile)
    stand_in = {"<|patch|>": PATCH_ID, "<|image_start|>": 6, "<|image_end|>": 7, "<|image|>": 8}
    ids = tokens(32, 7) + [stand_in[t] for t in layout] + tokens(40, 8)  # blocks 0-1 text, block 2 the image
    cat, dog = (Image.of(torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(s)), (1, 1))
                for s in (1, 2))

    def ask(engine, image):
        return engine.run([Request(ids, SamplingParams(max_tokens=4, ignore_eos=True), images=(image,))])[0]

    ask(engine_with_tier(model, path, redis_server.url), cat)
    other_image = ask(engine_with_tier(model, path, redis_server.url), dog)
    assert other_image.num_cached == 32  # the text before the image, and no further
    same_image = ask(engine_with_tier(model, path, redis_server.url), cat)
    assert same_image.num_cached == 64  # through the image's block and beyond
    fresh = ask(Engine(model), cat)
    assert same_image.output_ids == fresh.output_ids
