"""Many clients at once through `herd up`: time to first token and inter-token latency under
load, for one or more source trees side by side in one run (e.g. before and after a change).

32 concurrent clients on the default model, each sending two requests in turn: prompts of
16 to 512 tokens, 32 new tokens, and 4 of the 32 clients asking for 256 (long outputs). The
KV cache is kept small (4,096 tokens) so that admission policy matters.
Run: .venv/bin/python -m bench.bench_load [--trees DIR ...] [--clients 32]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_table
from herd.client import Client

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ("attention_port: {port}\nhttp_port: 0\ndashboard: false\n"
          "batching: {{max_cache_tokens: 4096, max_num_seqs: 32}}\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_client(target: str, i: int, rng_seed: int) -> list[tuple[float, list[float]]]:
    """(time to first token, inter-token gaps) of each of this client's requests."""
    rng, client, out = random.Random(rng_seed * 1000 + i), Client(target), []
    for _ in range(2):
        ids = [rng.randrange(100, 40000) for _ in range(rng.randint(16, 512))]
        start, stamps = time.perf_counter(), []
        for msg in client.generate(ids=ids, max_tokens=256 if i % 8 == 0 else 32, ignore_eos=True):
            stamps.extend([time.perf_counter()] * len(msg.token_ids))
        out.append((stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]))
    return out


def run_tree(tree: Path, clients: int, port: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CONFIG.format(port=port))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "herd", "up", "--config", f.name], cwd=tree, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("herd is up"):
                break
        target = f"127.0.0.1:{port}"
        list(Client(target).generate(ids=[1, 2, 3], max_tokens=2))  # warm-up
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(lambda i: one_client(target, i, 1), range(clients)) for r in rs]
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(120)
        os.unlink(f.name)
    ttft = [t for t, _ in results]
    gaps = [g for _, gs in results for g in gs]
    tokens = sum(len(gs) + 1 for _, gs in results)
    return {"p50 ttft": statistics.median(ttft), "p99 ttft": percentile(ttft, 0.99),
            "p50 itl": statistics.median(gaps), "tok/s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", nargs="+", default=[str(ROOT)], help="source trees to compare, in order")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--port", type=int, default=50071)
    args = ap.parse_args()
    rows = []
    for tree in args.trees:
        r = run_tree(Path(tree).resolve(), args.clients, args.port)
        rows.append([tree, r["p50 ttft"], r["p99 ttft"], r["p50 itl"] * 1000, r["tok/s"]])
    print_table(f"{args.clients} clients x 2 requests, default model, cache 4096 tokens",
                ["tree", "p50 TTFT s", "p99 TTFT s", "p50 ITL ms", "tok/s"], rows)


if __name__ == "__main__":
    main()
