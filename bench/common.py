"""Helpers shared by the benchmarks: medians, the machine's matmul peak, table printing, and
another attention service beside a running cluster."""
from __future__ import annotations

import json
import statistics
import time

import torch

from herd.client import Client


def median_time(fn, runs: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(dtype=torch.float32, n: int = 2048, runs: int = 5) -> float:
    """fp32 GEMM throughput of this machine, measured now (the yardstick for FLOP/s ratios)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = median_time(lambda: torch.mm(a, b), runs=runs, warmup=2)
    return 2 * n**3 / seconds / 1e9


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def attention_beside(cluster, name: str, router: bool, batching: dict, dispatch: str | None = None) -> Client:
    """Another attention service with the cluster's argv and environment (no HTTP); without router,
    its experts run in-process; dispatch: "router" or "direct" (default: the cluster's). The
    cluster stops it with the rest."""
    argv, env, ready = cluster._specs["attention"]
    argv = list(argv)
    if dispatch is not None:
        argv[argv.index("--dispatch") + 1] = dispatch
    at = argv.index("--batching") + 1
    argv[at] = json.dumps({**json.loads(argv[at]), **batching})
    argv[argv.index("--port") + 1] = "0"
    for flag in ("--http-port", "--served-model-name") + (() if router else ("--router", "--dispatch")):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    return Client(cluster._spawn(name, argv, env, ready))
