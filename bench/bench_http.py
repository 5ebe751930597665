"""The same 32-client load through the OpenAI-compatible HTTP API and through gRPC, on one cluster.

Each client sends REQUESTS streamed completions (prompt of ~PROMPT tokens, MAX_TOKENS tokens,
ignore_eos); runs alternate gRPC, HTTP, gRPC, ... so drift hits both alike. Prints throughput
(generated tokens/s) and p50/p99 time to first token, and the HTTP / gRPC ratios.
Run: .venv/bin/python -m bench.bench_http [--runs 3] [--clients 32]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time

import requests

from bench.common import print_table
from herd.client import Client
from herd.deploy import DeployConfig
from herd.up import Cluster
from llama4.store import DEFAULT_MODEL

PROMPT_WORDS, MAX_TOKENS, REQUESTS = 48, 32, 2


def prompt(i: int) -> str:
    return f"Client {i} asks: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(PROMPT_WORDS))


def grpc_one(client: Client, text: str) -> tuple[float, int]:
    start, first, n = time.perf_counter(), None, 0
    for msg in client.generate(text=text, max_tokens=MAX_TOKENS, ignore_eos=True):
        if msg.token_ids and first is None:
            first = time.perf_counter() - start
        n += len(msg.token_ids)
    return first, n


def http_one(session: requests.Session, url: str, key: str, text: str) -> tuple[float, int]:
    start, first, n = time.perf_counter(), None, 0
    body = {"model": DEFAULT_MODEL, "prompt": text, "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True,
            "temperature": 0, "return_token_ids": True}
    with session.post(url, json=body, stream=True, timeout=600, headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            ids = json.loads(line[6:])["choices"][0].get("token_ids", [])
            if ids and first is None:
                first = time.perf_counter() - start
            n += len(ids)
    return first, n


def run(clients: int, one) -> tuple[float, list[float]]:
    def client_loop(i: int):
        return [one(i, prompt(i * REQUESTS + r)) for r in range(REQUESTS)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    elapsed = time.perf_counter() - start
    return sum(n for _, n in results) / elapsed, [t for t, _ in results]


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    cfg = DeployConfig.load(None, workers=args.workers, attention_port=0, http_port=0, dashboard=False,
                            batching={"max_num_seqs": args.clients})
    with Cluster(cfg, log=lambda *_: None) as cluster:
        grpc_client = Client(cluster.attention_address)
        sessions = [requests.Session() for _ in range(args.clients)]
        url = f"http://{cluster.http_address}/v1/completions"
        ways = {"gRPC": lambda i, text: grpc_one(grpc_client, text),
                "HTTP": lambda i, text: http_one(sessions[i % args.clients], url, cluster.api_key, text)}
        run(4, ways["gRPC"]), run(4, ways["HTTP"])  # warm-up
        results = {name: [] for name in ways}
        for _ in range(args.runs):
            for name, one in ways.items():
                results[name].append(run(args.clients, one))
    rows = []
    for name, runs in results.items():
        rows.append([name, statistics.median(t for t, _ in runs),
                     statistics.median(quantile(ttft, 0.5) for _, ttft in runs),
                     statistics.median(quantile(ttft, 0.99) for _, ttft in runs)])
    print_table(f"{args.clients} clients x {REQUESTS} streamed requests ({MAX_TOKENS} tokens), default model, "
                f"{args.workers} workers, median of {args.runs}", ["API", "tokens/s", "p50 TTFT s", "p99 TTFT s"], rows)
    g, h = rows
    print(f"\nHTTP / gRPC: throughput {h[1] / g[1]:.3f}, p50 TTFT {h[2] / g[2]:.3f}, p99 TTFT {h[3] / g[3]:.3f}")


if __name__ == "__main__":
    main()
