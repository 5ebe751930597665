"""Cluster vs monolithic on bench-maverick, side by side in one run, same weights and kernels.

Decode tokens/s at batch 1, 8, 64; prefill of 4 x 512 tokens; RPCs per MoE layer per step;
protobuf bytes on the wire per token per MoE layer over the minimum (hidden * itemsize each
way on each of the two hops). Run: .venv/bin/python -m bench.bench_cluster [--runs 3]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

import torch

from bench.common import print_table
from herd.client import Client
from herd.deploy import DeployConfig
from herd.up import Cluster
from herdpb import expert_pb2, router_pb2
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import resolve_model
from plumbing.tensor_codec import write_tensor

PROMPT, STEPS, PREFILL = 32, 16, 512


def mono_decode(model, batch, gen) -> float:
    engine = Engine(model, max_num_seqs=batch, max_step_tokens=batch * PROMPT)
    for _ in range(batch):
        engine.add(Request(torch.randint(3, model.cfg.vocab_size, (PROMPT,), generator=gen).tolist(),
                           SamplingParams(max_tokens=STEPS + 1, ignore_eos=True)))
    engine.step()
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return batch * STEPS / (time.perf_counter() - start)


def cluster_decode(client, batch, vocab, gen) -> float:
    prompts = [torch.randint(3, vocab, (PROMPT,), generator=gen).tolist() for _ in range(batch)]
    firsts, lasts = [], []

    def one(p):
        first = None
        for _ in client.generate(ids=p, max_tokens=STEPS + 1, ignore_eos=True):
            now = time.perf_counter()
            first = first or now
        firsts.append(first)
        lasts.append(now)

    with concurrent.futures.ThreadPoolExecutor(batch) as pool:
        list(pool.map(one, prompts))
    return batch * STEPS / (max(lasts) - max(firsts))


def mono_prefill(model, gen) -> float:
    engine = Engine(model, max_num_seqs=4, max_step_tokens=4 * PREFILL)
    reqs = [Request(torch.randint(3, model.cfg.vocab_size, (PREFILL,), generator=gen).tolist(),
                    SamplingParams(max_tokens=1))
            for _ in range(4)]
    start = time.perf_counter()
    engine.run(reqs)
    return 4 * PREFILL / (time.perf_counter() - start)


def cluster_prefill(client, vocab, gen) -> float:
    prompts = [torch.randint(3, vocab, (PREFILL,), generator=gen).tolist() for _ in range(4)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: list(client.generate(ids=p, max_tokens=1)), prompts))
    return 4 * PREFILL / (time.perf_counter() - start)


def wire_ratio(cfg, tokens: int, workers_hit: int) -> float:
    """Serialized bytes of one MoE layer's messages for `tokens` tokens over the minimum."""
    h = cfg.hidden_size
    x = torch.zeros(tokens, h)
    route = router_pb2.RouteRequest(layer=1)
    write_tensor(route.x, x)
    back = router_pb2.RouteResponse(expert_ids=[127] * tokens, workers=[3] * tokens)  # as the router answers
    write_tensor(back.y, x)
    total = route.ByteSize() + back.ByteSize()
    per = [tokens // workers_hit + (1 if i < tokens % workers_hit else 0) for i in range(workers_hit)]
    for rows in per:
        req = expert_pb2.RunExpertsRequest(layer=1, expert_ids=[127] * rows)
        write_tensor(req.x, torch.zeros(rows, h))
        resp = expert_pb2.RunExpertsResponse()
        write_tensor(resp.y, torch.zeros(rows, h))
        total += req.ByteSize() + resp.ByteSize()
    minimum = tokens * h * 4 * 2 * 2  # 2 hops, out and back
    return total / minimum


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    path = resolve_model("bench-maverick")
    model = Llama4Model.load(Checkpoint(path))
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    dcfg = DeployConfig.load(None, model="bench-maverick", workers=args.workers, attention_port=0, http_port=0,
                             dashboard=False)
    with Cluster(dcfg, log=lambda *_: None) as cluster:
        client = Client(cluster.attention_address)
        rows = []
        for b in [int(x) for x in args.batches.split(",")]:
            mono_decode(model, b, gen)
            cluster_decode(client, b, cfg.vocab_size, gen)  # warm-up
            m = statistics.median(mono_decode(model, b, gen) for _ in range(args.runs))
            before = client.status()
            c = statistics.median(cluster_decode(client, b, cfg.vocab_size, gen) for _ in range(args.runs))
            after = client.status()
            routes = after.router.routes - before.router.routes
            worker_rpcs = (after.router.worker_rpcs - before.router.worker_rpcs) / max(routes, 1)
            rows.append([f"decode batch {b}", m, c, c / m, worker_rpcs])
        m = statistics.median(mono_prefill(model, gen) for _ in range(args.runs))
        c = statistics.median(cluster_prefill(client, cfg.vocab_size, gen) for _ in range(args.runs))
        rows.append(["prefill 4x512", m, c, c / m, float("nan")])
        st = client.status()
        steps, route_rpcs = st.steps, st.route_rpcs
    print_table(f"bench-maverick, {args.workers} expert workers, fp32, median of {args.runs} (tokens/s)",
                ["case", "monolithic", "cluster", "cluster / mono", "RunExperts per Route"], rows)
    print(f"\nRoute RPCs per MoE layer per step: {route_rpcs / steps / len(cfg.moe_layers):.2f}")
    for tokens in (1, 8, 64):
        print(f"wire bytes / minimum at {tokens} tokens per step: "
              f"{wire_ratio(cfg, tokens, min(tokens, args.workers)):.3f}")


if __name__ == "__main__":
    main()
