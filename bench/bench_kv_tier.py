"""Redis KV tier: time to first token of a 2,048-token prompt, warm prefix vs cold, and the
tier's load bandwidth vs plain redis-py GETs of the same entry sizes, in one run.
Run: .venv/bin/python -m bench.bench_kv_tier [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import redis
import torch

from attention_svc.kv_tier import RedisKVTier
from bench.common import print_table
from herd.redis_server import RedisServer
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import resolve_model

PROMPT = 2048


def ttft(model, fingerprint, url, prompt) -> tuple[float, RedisKVTier]:
    tier = RedisKVTier(url, fingerprint, model.cfg, model.dtype)
    engine = Engine(model, max_step_tokens=PROMPT + 16, kv_tier=tier)
    start = time.perf_counter()
    engine.run([Request(prompt, SamplingParams(max_tokens=1))])
    return time.perf_counter() - start, engine.kv_tier


def plain_get_bandwidth(url: str, sizes: list[int], rounds: int = 20) -> float:
    r = redis.Redis.from_url(url)
    for i, size in enumerate(sizes):
        r.set(f"bench:blob:{i}", b"\x01" * size)
    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(len(sizes)):
            r.get(f"bench:blob:{i}")
    return rounds * sum(sizes) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="bench-maverick")
    args = ap.parse_args()
    path = resolve_model(args.model)
    ckpt = Checkpoint(path)
    model = Llama4Model.load(ckpt)
    fingerprint = ckpt.fingerprint()
    server = RedisServer(maxmemory="2gb")
    gen = torch.Generator().manual_seed(0)
    try:
        cold, warm, tier_bw = [], [], []
        for _ in range(args.runs + 1):  # the first round warms up
            prompt = torch.randint(3, model.cfg.vocab_size, (PROMPT,), generator=gen).tolist()
            t_cold, _ = ttft(model, fingerprint, server.url, prompt)
            t_warm, tier = ttft(model, fingerprint, server.url, prompt)
            cold.append(t_cold)
            warm.append(t_warm)
            tier_bw.append(tier.stats.bytes_read / tier.stats.load_seconds)
            cached = tier.stats.tokens_loaded
        cold, warm, tier_bw = cold[1:], warm[1:], tier_bw[1:]
        r = redis.Redis.from_url(server.url)
        sizes = sorted({len(r.get(k)) for k in list(r.scan_iter("herd:kv:*"))[:50]})
        plain = plain_get_bandwidth(server.url, sizes)
    finally:
        server.stop()
    c, w = statistics.median(cold), statistics.median(warm)
    print_table(f"{args.model}, {PROMPT}-token prompt, median of {args.runs}",
                ["case", "time to first token s", "vs cold"],
                [["cold (recompute)", c, 1.0], [f"warm ({cached} tokens from Redis)", w, w / c]])
    bw = statistics.median(tier_bw)
    print(f"\ntier load bandwidth (GET + checks + copy into the cache): {bw / 2**20:.0f} MiB/s; "
          f"plain redis-py GET of the same entry sizes {sizes}: {plain / 2**20:.0f} MiB/s; ratio {bw / plain:.2f}")


if __name__ == "__main__":
    main()
