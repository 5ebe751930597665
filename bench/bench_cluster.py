"""Cluster vs monolithic on bench-maverick, side by side in one run, same weights and kernels.

Decode tokens/s at batch 1, 8, 64; prefill of 4 x 512 tokens; RPCs per MoE layer per step;
protobuf bytes on the wire per token per MoE layer over the minimum (hidden * itemsize each
way on each of the two hops). "mono server" is the monolithic engine behind the same gRPC front
end (an attention service with the experts in-process): cluster / mono server is the cost of
disaggregation alone, cluster / monolithic also that of serving over gRPC. With
--micro-batches 1,2 one attention service per count runs against the same router and workers
(the cluster's own has the first), and with --dispatch router,direct one per dispatch mode
(direct: the service gates and sends to the workers itself), each measured in turn within every run.
Run: .venv/bin/python -m bench.bench_cluster [--runs 3] [--micro-batches 1] [--dispatch router,direct]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import time

# Before torch loads: the monolithic model in this process must not spin its OpenMP threads while
# the cluster's processes compute (herd up sets the same for its children).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from bench.common import attention_beside, print_table
from herd.client import Client
from herd.deploy import DeployConfig
from herd.up import Cluster
from herdpb import expert_pb2, router_pb2
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request, auto_micro_batches
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
    ap.add_argument("--micro-batches", default="1", help="micro-batch counts measured side by side")
    ap.add_argument("--dispatch", default="router,direct", help="dispatch modes measured side by side")
    ap.add_argument("--no-prefill", action="store_true")
    args = ap.parse_args()
    counts = [int(x) for x in args.micro_batches.split(",")]
    modes = args.dispatch.split(",")
    path = resolve_model("bench-maverick")
    model = Llama4Model.load(Checkpoint(path))
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    dcfg = DeployConfig.load(None, model="bench-maverick", workers=args.workers, attention_port=0, http_port=0,
                             dashboard=False)
    dcfg.batching.micro_batches = counts[0]  # not a Batching field yet (herd/deploy.py); herd up passes it on
    with Cluster(dcfg, log=lambda *_: None) as cluster:
        # label -> client; the cluster's own service is the first (dispatch: router, counts[0] micro-batches)
        clients = {}
        for mode in modes:
            for k in counts:
                label = f"{mode} mb={k}"
                if mode == "router" and k == counts[0]:
                    clients[label] = Client(cluster.attention_address)
                else:
                    clients[label] = attention_beside(cluster, f"attention-{mode}-mb{k}", True, {"micro_batches": k},
                                                      dispatch=mode)
        # The monolithic engine behind the same gRPC front end (experts in-process, no router):
        # cluster / this is what disaggregation costs, apart from serving over gRPC at all.
        served = attention_beside(cluster, "attention-mono", False, {})
        rows, per_route = [], {}
        cases = [(f"decode batch {b}", b) for b in [int(x) for x in args.batches.split(",")]]
        if not args.no_prefill:
            cases.append(("prefill 4x512", None))
        for name, b in cases:
            if b is None:
                mono_fn = lambda: mono_prefill(model, gen)
                fn = lambda c: cluster_prefill(c, cfg.vocab_size, gen)
                chosen = auto_micro_batches(True, dcfg.device, 4, 4 * PREFILL)
            else:
                mono_fn = lambda b=b: mono_decode(model, b, gen)
                fn = lambda c, b=b: cluster_decode(c, b, cfg.vocab_size, gen)
                chosen = auto_micro_batches(True, dcfg.device, b, b)
                mono_fn()
                for c in (served, *clients.values()):
                    fn(c)  # warm-up
            m, ms, got = [], [], {k: [] for k in clients}
            before = {k: c.status() for k, c in clients.items()}
            for _ in range(args.runs):  # in turn within each run: the machine's drift hits every side alike
                m.append(mono_fn())
                ms.append(fn(served))
                for k, c in clients.items():
                    got[k].append(fn(c))
            after = {k: c.status() for k, c in clients.items()}
            mono, mono_served = statistics.median(m), statistics.median(ms)
            row = [name, mono, mono_served]
            for k in clients:
                med = statistics.median(got[k])
                routes = after[k].router.routes - before[k].router.routes
                per_route[(name, k)] = (after[k].router.worker_rpcs - before[k].router.worker_rpcs) / max(routes, 1)
                row += [med, med / mono, med / mono_served]
            rows.append(row + [chosen])
            print(" ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in rows[-1]), flush=True)
        steps = {k: c.status() for k, c in clients.items()}
    header = ["case", "monolithic", "mono server"]
    for k in clients:
        header += [f"cluster {k}", f"{k} / mono", f"{k} / server"]
    print_table(f"bench-maverick, {args.workers} expert workers, fp32, median of {args.runs} (tokens/s)",
                header + ["auto picks"], rows)
    for k, st in steps.items():
        print(f"\n{k}: Route exchanges per MoE layer per step: {st.route_rpcs / st.steps / len(cfg.moe_layers):.2f}")
    # One router serves every attention service (and hears from the direct ones): its counters cover them all.
    first = next(iter(clients))
    print("RunExperts per Route: " + ", ".join(f"{n} {v:.2f}" for (n, k), v in per_route.items() if k == first))
    for tokens in (1, 8, 64):
        print(f"wire bytes / minimum at {tokens} tokens per step: "
              f"{wire_ratio(cfg, tokens, min(tokens, args.workers)):.3f}")


if __name__ == "__main__":
    main()
