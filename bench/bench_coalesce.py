"""Two attention services on one router: what coalescing their exchanges buys, side by side.

`herd up` starts bench-maverick with 4 expert workers and its router (coalescing, the default);
beside it a second router on the same workers with coalescing off (`--no-coalesce`), and two
attention services on each router. Each run sends the same load to each pair in turn: 16 streams
to each of its two services at once (32 streams: prompts of 32 tokens, 16 generated tokens), and
measures the pair's total decode tokens/s. It reports, per router, the worker exchanges
(RunExperts) per Route exchange, divided by the workers that hold experts: below 1 per worker
per replica means exchanges from the two services reached a worker together.
Run: .venv/bin/python -m bench.bench_coalesce [--runs 3] [--streams 16]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from bench.common import print_table  # noqa: E402
from herd.client import Client  # noqa: E402
from herd.deploy import DeployConfig  # noqa: E402
from herd.up import Cluster  # noqa: E402
from llama4.config import ModelConfig  # noqa: E402
from llama4.store import resolve_model  # noqa: E402

PROMPT, STEPS = 32, 16


def _router_beside(cluster, name: str, extra: list[str]) -> str:
    argv, env, ready = cluster._specs["router"]
    argv = list(argv)
    argv[argv.index("--port") + 1] = "0"
    if "--metrics-port" in argv:
        argv[argv.index("--metrics-port") + 1] = "0"
    return cluster._spawn(name, [*argv, *extra], env, ready)


def _attention_on(cluster, name: str, router: str) -> Client:
    argv, env, ready = cluster._specs["attention"]
    argv = list(argv)
    argv[argv.index("--port") + 1] = "0"
    argv[argv.index("--router") + 1] = router
    for flag in ("--http-port", "--served-model-name"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    return Client(cluster._spawn(name, argv, env, ready))


def pair_decode(clients: list[Client], streams: int, vocab: int, gen) -> float:
    """Total decode tokens/s of `streams` streams on each client at once."""
    jobs = [(c, torch.randint(3, vocab, (PROMPT,), generator=gen).tolist()) for c in clients for _ in range(streams)]
    firsts, lasts = [], []

    def one(job):
        client, prompt = job
        first = now = None
        for _ in client.generate(ids=prompt, max_tokens=STEPS + 1, ignore_eos=True):
            now = time.perf_counter()
            first = first or now
        firsts.append(first)
        lasts.append(now)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(one, jobs))
    return len(jobs) * STEPS / (max(lasts) - max(firsts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16, help="streams on each attention service")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    path = resolve_model("bench-maverick")
    vocab = ModelConfig.from_dir(path).vocab_size
    gen = torch.Generator().manual_seed(0)
    dcfg = DeployConfig.load(None, model="bench-maverick", workers=args.workers, attention_port=0, http_port=0,
                             dashboard=False, kv_tier=False)
    with Cluster(dcfg, log=lambda *_: None) as cluster:
        plain = _router_beside(cluster, "router-plain", ["--no-coalesce"])
        pairs = {"coalescing": [_attention_on(cluster, f"attention-c{i}", cluster.router_address) for i in (1, 2)],
                 "not coalescing": [_attention_on(cluster, f"attention-p{i}", plain) for i in (1, 2)]}
        for clients in pairs.values():
            pair_decode(clients, 2, vocab, gen)  # warm-up: streams open, weights touched
        got = {name: [] for name in pairs}
        before = {name: clients[0].status().router for name, clients in pairs.items()}
        for _ in range(args.runs):  # in turn within each run: drift hits both alike
            for name, clients in pairs.items():
                got[name].append(pair_decode(clients, args.streams, vocab, gen))
                print(f"{name}: {got[name][-1]:.1f} tok/s", flush=True)
        after = {name: clients[0].status().router for name, clients in pairs.items()}
    rows = []
    base = statistics.median(got["not coalescing"])
    for name in pairs:
        routes = after[name].routes - before[name].routes
        rpcs = after[name].worker_rpcs - before[name].worker_rpcs
        med = statistics.median(got[name])
        rows.append([name, med, f"{min(got[name]):.3g}-{max(got[name]):.3g}", med / base,
                     rpcs / max(routes, 1), rpcs / max(routes, 1) / args.workers])
    print_table(f"bench-maverick, {args.workers} expert workers, two attention services x {args.streams} streams "
                f"on one router, median of {args.runs} (decode tokens/s of the pair)",
                ["router", "tok/s", "range", "/ not coalescing", "RunExperts per Route", "per worker"], rows)


if __name__ == "__main__":
    main()
