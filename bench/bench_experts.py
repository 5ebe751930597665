"""Routed experts: the loop per expert against grouped and batched matmuls, side by side in one run.

bench-maverick's expert shape (hidden 1024, intermediate 512, fp32), every expert of a bank
given the same number of rows (1, 4, 16, 64), plus a decode-like case with few experts active.
Candidates: `loop` (the kernel before: one matmul pair per active expert from Python, weights
[E, in, out] row-major), `loop out` (the same loop on the out-major bank), `grouped in`
(torch._grouped_mm over the whole [E, in, out] bank), `grouped` (what herd runs now:
kernels.grouped_expert_ffn on a DenseBank, torch._grouped_mm over the out-major bank), `bmm pad`
(rows padded to the largest count, torch.bmm over every expert's weights, idle ones included)
and `bmm gather` (the active experts' weights copied out with index_select, then bmm).
Run: .venv/bin/python -m bench.bench_experts [--experts 32] [--runs 7] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import matmul_peak_gflops, print_table
from kernels import grouped_expert_ffn
from kernels.quant import DenseBank

H, I = 1024, 512  # bench-maverick: hidden, expert intermediate


def loop_ffn(x, ids, w13, w2):
    """The grouped expert FFN as it was: sort, then one matmul pair per active expert."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids).tolist()
    xs, ys = x[order], torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = (xs[start : start + n] @ w13[e]).chunk(2, dim=-1)
            ys[start : start + n] = (F.silu(gate) * up) @ w2[e]
            start += n
    out = torch.empty_like(ys)
    out[order] = ys
    return out


def _padded(x, ids, num_experts):
    """x [N, H] -> [E, R, H] (R = the largest count), zeros where an expert has fewer rows; each row's slot."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts)
    starts = counts.cumsum(0) - counts
    sorted_ids = ids[order]
    slot = torch.arange(len(ids)) - starts[sorted_ids]
    pad = x.new_zeros(num_experts, int(counts.max()), x.shape[1])
    pad[sorted_ids, slot] = x[order]
    return pad, order, sorted_ids, slot


def bmm_pad_ffn(x, ids, w13, w2):
    pad, order, sorted_ids, slot = _padded(x, ids, w13.shape[0])
    gate, up = torch.bmm(pad, w13).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, w2)
    out = torch.empty_like(x)
    out[order] = y[sorted_ids, slot]
    return out


def bmm_gather_ffn(x, ids, w13, w2):
    active, local = torch.unique(ids, return_inverse=True)
    pad, order, sorted_ids, slot = _padded(x, local, len(active))
    gate, up = torch.bmm(pad, w13.index_select(0, active)).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, w2.index_select(0, active))
    out = torch.empty_like(x)
    out[order] = y[sorted_ids, slot]
    return out


def interleaved_medians(fns: dict, runs: int) -> dict[str, float]:
    """Median seconds of each fn, the candidates taking turns in every round (noise hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(runs + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32, help="experts in the bank (a worker of 4 holds 32)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    e = args.experts
    w13, w2 = torch.randn(e, H, 2 * I, generator=gen) * 0.03, torch.randn(e, I, H, generator=gen) * 0.03
    b13, b2 = DenseBank(w13), DenseBank(w2)  # out-major copies, as load_experts builds them
    i13, i2 = DenseBank(w13, out_major=False), DenseBank(w2, out_major=False)
    if not b13.grouped or not i13.grouped:
        raise SystemExit("torch._grouped_mm does not take this shape here: nothing to compare")
    cases = [(f"{r} rows x {e} experts", torch.arange(e).repeat_interleave(r)) for r in (1, 4, 16, 64)]
    cases += [("1 row, 1 expert", torch.tensor([e // 2])),
              (f"8 rows on 8 of {e} experts", torch.arange(0, e, max(1, e // 8))[:8])]
    candidates = {"loop": lambda x, ids: loop_ffn(x, ids, w13, w2),
                  "loop out": lambda x, ids: loop_ffn(x, ids, b13.w, b2.w),
                  "grouped in": lambda x, ids: grouped_expert_ffn(x, ids, i13, i2),
                  "grouped": lambda x, ids: grouped_expert_ffn(x, ids, b13, b2),
                  "bmm pad": lambda x, ids: bmm_pad_ffn(x, ids, w13, w2),
                  "bmm gather": lambda x, ids: bmm_gather_ffn(x, ids, w13, w2)}
    rows = []
    with torch.inference_mode():
        for name, ids in cases:
            ids = ids[torch.randperm(len(ids), generator=gen)]
            x = torch.randn(len(ids), H, generator=gen)
            want = loop_ffn(x, ids, w13, w2)
            for cand, fn in candidates.items():
                if not torch.allclose(fn(x, ids), want, rtol=1e-4, atol=1e-5):
                    raise SystemExit(f"{cand} disagrees with the loop on {name}")
            seconds = interleaved_medians({c: (lambda fn=fn, x=x, ids=ids: fn(x, ids)) for c, fn in candidates.items()},
                                          args.runs)
            ms = {c: t * 1e3 for c, t in seconds.items()}
            gflops = 6 * len(ids) * H * I / (ms["grouped"] * 1e-3) / 1e9
            rows.append([name, ms["loop"], ms["loop out"], ms["grouped in"], ms["grouped"], ms["loop"] / ms["grouped"],
                         ms["bmm pad"], ms["bmm gather"], gflops])
    peak = matmul_peak_gflops()
    print_table(f"grouped expert FFN, H={H} I={I}, {e} experts in the bank, fp32, {args.threads} threads, "
                f"median of {args.runs} (ms)",
                ["case", "loop", "loop out", "grouped in", "grouped", "loop / grouped", "bmm pad", "bmm gather",
                 "grouped GFLOP/s"], rows)
    print(f"\nfp32 matmul peak measured now: {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
