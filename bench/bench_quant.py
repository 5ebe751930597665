"""Quantized experts on bench-maverick: fp32 vs FP8-stored vs int8 vs int4 experts, side by side in one run.

For each expert dtype: resident routed-expert bytes (monolithic, and summed over the cluster's
workers as `herd status` reports them), the expert workers' RSS, the kernel each bank runs, and
decode tokens/s at batch 1 and 64, monolithic and through the cluster. FP8 experts are quantized
at load here (per channel, as compressed-tensors writes them), so the four rows share one checkpoint.
Run: .venv/bin/python -m bench.bench_quant [--runs 3]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bench.bench_cluster import cluster_decode, mono_decode
from bench.common import print_table
from herd.client import Client
from herd.deploy import DeployConfig
from herd.up import Cluster
from llama4.checkpoint import Checkpoint
from llama4.model import Llama4Model
from llama4.store import resolve_model
from llama4.weights import expert_bytes

KINDS = ("compute", "fp8", "int8", "int4-g32")
GIB = 2**30


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    path = resolve_model("bench-maverick")
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for kind in args.kinds.split(","):
        model = Llama4Model.load(Checkpoint(path), expert_dtype=kind)
        held = sum(expert_bytes(model.moe.experts).values())
        kernel = "/".join(sorted({b.kernel for pair in model.moe.experts.values() for b in pair}))
        mono = {b: statistics.median(mono_decode(model, b, gen) for _ in range(args.runs)) for b in batches}
        del model
        dcfg = DeployConfig.load(None, model="bench-maverick", workers=args.workers, attention_port=0, http_port=0,
                                 dashboard=False, expert_dtype=kind)
        with Cluster(dcfg, log=lambda *_: None) as cluster:
            client = Client(cluster.attention_address)
            st = Client(cluster.attention_address, operator=True).status()
            worker_held = sum(n for w in st.router.workers for n in w.expert_bytes.values())
            import ray  # after herd up has set Ray's auth environment, which ray reads when imported

            pids = [info["pid"] for info in ray.get([a.info.remote() for a in cluster.actors])]
            rss = sum(rss_bytes(p) for p in pids)
            remote = {}
            for b in batches:
                cluster_decode(client, b, 32000, gen)  # warm-up
                remote[b] = statistics.median(cluster_decode(client, b, 32000, gen) for _ in range(args.runs))
        rows.append([kind, kernel, held / GIB, worker_held / GIB, rss / GIB,
                     *[x for b in batches for x in (mono[b], remote[b])]])
    base = rows[0]
    print_table(f"bench-maverick experts by dtype, {args.workers} workers, median of {args.runs} (GiB; tokens/s)",
                ["experts", "kernel", "mono experts", "workers' experts", "workers' RSS",
                 *[f"{where} b={b}" for b in batches for where in ("mono", "cluster")]], rows)
    print("\nratios to the first row (memory: smaller is better; speed: larger is better)")
    for row in rows[1:]:
        speed = "  ".join(f"b={b} mono {row[5 + 2 * i] / base[5 + 2 * i]:.2f}x "
                          f"cluster {row[6 + 2 * i] / base[6 + 2 * i]:.2f}x" for i, b in enumerate(batches))
        print(f"  {row[0]:>7}: experts {base[2] / row[2]:.2f}x smaller, workers' RSS {base[4] / row[4]:.2f}x smaller; "
              f"{speed}")


if __name__ == "__main__":
    main()
