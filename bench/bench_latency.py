"""What a user waits for: time to first token and inter-token latency at 1 and 16 concurrent
streams, on the default model through `herd up`, cluster vs monolithic.

One `herd up` (4 expert workers) and, beside its attention service (dispatch: router,
micro_batches auto: 1 on a CPU), two more on the same process layout: one with the experts
in-process (the monolithic engine behind the same gRPC API: no router) and one in dispatch:
direct (it gates and sends to the workers itself, over the router's table). Each run sends
the same load to each in turn; each stream has its own random prompt of PROMPT tokens and asks
for MAX_TOKENS. TTFT: request sent to first token; ITL: (last token - first token) / (tokens - 1)
of each stream. Medians over streams, then over runs.
Run: .venv/bin/python -m bench.bench_latency [--runs 5] [--streams 1,16]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

import torch

from bench.common import attention_beside, print_table
from herd.client import Client
from herd.deploy import DeployConfig
from herd.up import Cluster
from llama4.config import ModelConfig
from llama4.store import DEFAULT_MODEL, resolve_model

PROMPT, MAX_TOKENS = 128, 32


def one_stream(client: Client, ids: list[int]) -> tuple[float, float]:
    start, times = time.perf_counter(), []
    for msg in client.generate(ids=ids, max_tokens=MAX_TOKENS, ignore_eos=True):
        times += [time.perf_counter()] * len(msg.token_ids)
    return times[0] - start, (times[-1] - times[0]) / max(len(times) - 1, 1)


def load(client: Client, streams: int, vocab: int, gen: torch.Generator) -> tuple[float, float]:
    """(median TTFT, median ITL) in seconds of `streams` concurrent streams."""
    prompts = [torch.randint(3, vocab, (PROMPT,), generator=gen).tolist() for _ in range(streams)]
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        got = list(pool.map(lambda p: one_stream(client, p), prompts))
    return statistics.median(t for t, _ in got), statistics.median(i for _, i in got)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    vocab = ModelConfig.from_dir(str(resolve_model(DEFAULT_MODEL))).vocab_size
    cfg = DeployConfig.load(None, workers=args.workers, attention_port=0, http_port=0, dashboard=False)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with Cluster(cfg, log=lambda *_: None) as cluster:
        targets = {"monolithic": attention_beside(cluster, "attention-mono", False, {}),
                   "cluster": Client(cluster.attention_address),
                   "cluster direct": attention_beside(cluster, "attention-direct", True, {}, dispatch="direct")}
        for streams in [int(s) for s in args.streams.split(",")]:
            for client in targets.values():
                load(client, streams, vocab, gen)  # warm-up
            got = {name: [] for name in targets}
            for _ in range(args.runs):  # in turn within each run: drift hits every side alike
                for name, client in targets.items():
                    got[name].append(load(client, streams, vocab, gen))
            med = {name: (statistics.median(t for t, _ in r), statistics.median(i for _, i in r))
                   for name, r in got.items()}
            mono_ttft, mono_itl = med["monolithic"]
            for name, (ttft, itl) in med.items():
                rows.append([streams, name, ttft * 1e3, itl * 1e3, ttft / mono_ttft, itl / mono_itl])
    print_table(f"{DEFAULT_MODEL}, {args.workers} expert workers, prompt {PROMPT} tokens, {MAX_TOKENS} generated, "
                f"median of {args.runs}",
                ["streams", "serving", "TTFT ms", "ITL ms", "TTFT / mono", "ITL / mono"], rows)


if __name__ == "__main__":
    main()
