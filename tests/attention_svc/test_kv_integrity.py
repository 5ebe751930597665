"""KV tier integrity by construction: a Redis outage in the middle of a long generation never
leaves an entry that is not the block's own KV, and fingerprints tell models apart exactly."""
import json
import shutil

import torch
from safetensors import safe_open

from attention_svc.kv_tier import RedisKVTier
from herd.redis_server import RedisServer
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams


def fresh_blocks(model, tokens, bs=16):
    """Every full block's KV of `tokens`, computed in one pass with nothing released."""
    cache = model.new_cache(4096, block_size=bs)
    cache.ensure(0, len(tokens))
    model.hidden_states(torch.tensor(tokens), cache.plan([(0, 0, len(tokens))]), cache)
    return {(i, kind): cache.read_block(0, kind, i) for i in range(len(tokens) // bs) for kind in cache.kinds}


def test_redis_restart_mid_generation_leaves_only_true_entries(reference_models):
    path = reference_models["tiny-scout"][1]  # attention chunks of 32 tokens: chunked blocks are released often
    model = Llama4Model.load(Checkpoint(path))
    prompt = torch.randint(3, 1024, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    cold = Engine(model).run([Request(prompt, params)])[0]
    server = RedisServer()
    port, password = server.port, server.password
    try:
        tier = RedisKVTier(server.url, Checkpoint(path).fingerprint(), model.cfg, model.dtype)
        engine = Engine(model, max_step_tokens=32, kv_tier=tier)
        seq = engine.add(Request(prompt, params))
        for _ in range(2):
            engine.step()  # two prefill chunks computed and stored
        server.stop()  # Redis goes away while the prefill crosses chunk boundaries
        for _ in range(6):
            engine.step()
        server = RedisServer(port=port, password=password)  # back, empty
        tier._down_until = 0  # skip the back-off wait
        while engine.has_work:
            engine.step()
        assert seq.output_ids == cold.output_ids and tier.stats.errors >= 1
        truth = fresh_blocks(model, seq.tokens)
        checked = 0
        for (i, kind), kv in truth.items():
            h = engine.cache.block_hashes("probe", seq.tokens, i + 1)[i]
            raw = tier.redis.get(RedisKVTier.key(h, kind))
            if raw is not None:
                stored = tier.codec.decode_entry(raw, kind, (i + 1) * 16)
                assert (stored - kv).abs().max() <= 1e-5, (i, kind)
                checked += 1
        assert checked >= len(truth) // 3  # blocks computed after the restart were saved
        # The leading blocks were lost with Redis, so the next request on the prefix recomputes
        # (and saves) them; the one after reuses the prefix. Both answer exactly as a cold run.
        for _ in range(2):
            again = Engine(model, kv_tier=RedisKVTier(server.url, Checkpoint(path).fingerprint(), model.cfg,
                                                      model.dtype))
            warm = again.run([Request(prompt, params)])[0]
            assert warm.output_ids == cold.output_ids
            assert max(abs(a - b) for a, b in zip(warm.output_logprobs, cold.output_logprobs, strict=True)) <= 1e-5
        assert warm.num_cached > 0
    finally:
        server.stop()


def test_one_value_in_the_middle_of_a_tensor_changes_the_fingerprint(reference_models, tmp_path, herd_home):
    path = reference_models["tiny-maverick"][1]
    other = tmp_path / "other"
    shutil.copytree(path, other)
    weights = other / "model.safetensors"
    name = "model.layers.1.feed_forward.experts.down_proj"
    raw = bytearray(weights.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    lo, hi = header[name]["data_offsets"]
    middle = 8 + header_len + (lo + hi) // 2 // 4 * 4
    raw[middle : middle + 4] = torch.tensor([0.123], dtype=torch.float32).numpy().tobytes()
    weights.write_bytes(bytes(raw))
    assert weights.stat().st_size == (path / "model.safetensors").stat().st_size
    a, b = Checkpoint(path).fingerprint(), Checkpoint(other).fingerprint()
    assert a != b and len(a) == len(b) == 32
    assert Checkpoint(path).fingerprint() == a  # stable (and now served from the cached digests)
    with safe_open(weights, framework="pt") as f:  # the edit really is one value of one tensor
        changed = f.get_tensor(name)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert (changed != f.get_tensor(name)).sum() == 1
