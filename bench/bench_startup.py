"""The local cluster's footprint: time from `herd up` to the first streamed token, and the
resident memory of everything it started (Redis, Ray, expert workers, router, attention).
Run: .venv/bin/python -m bench.bench_startup [--model smollm2-moe]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil

from herd.client import Client


def tree_rss(pid: int) -> tuple[int, int]:
    """(proportional set size in bytes, number of processes) of pid and all its descendants.

    PSS splits each shared page among the processes that map it, so the sum is the memory the
    cluster really holds (summing RSS would count Ray's forked dashboard modules many times)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total, len(procs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--port", default="50061")
    args = ap.parse_args()
    cfg = f"attention_port: {args.port}\n" + (f"model: {args.model}\n" if args.model else "")
    path = "/tmp/herd-bench-startup.yaml"
    open(path, "w").write(cfg)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "up", "--config", path], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("herd is up"):
                break
        up = time.perf_counter() - start
        client = Client(f"127.0.0.1:{args.port}")
        first = None
        for _ in client.generate(chat=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16):
            first = first or time.perf_counter() - start
        rss, n = tree_rss(proc.pid)
        print(f"herd up -> SERVING: {up:.1f} s; -> first token: {first:.1f} s")
        print(f"resident memory (PSS) of the cluster: {rss / 2**30:.2f} GiB over {n} processes")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
