"""herd monolithic vs transformers on the same bench-maverick weights, side by side.

Prefill 1 x 512 tokens and decode at batch 1, 16, 64 (tokens/s, median of runs), plus the
machine's fp32 matmul peak measured in the same run and herd's prefill FLOP/s against it.
Run: .venv/bin/python -m bench.bench_model [--runs 5]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import matmul_peak_gflops, median_time, print_table
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import resolve_model

PREFILL = 512
DECODE_PROMPT, DECODE_STEPS = 32, 8


def herd_prefill(model: Llama4Model, ids: list[int]) -> None:
    cache = model.new_cache(4096)
    cache.ensure(0, len(ids))
    model.forward(torch.tensor(ids), cache.plan([(0, 0, len(ids))]), cache, torch.tensor([len(ids) - 1]))


def herd_decode_seconds(model: Llama4Model, batch: int, gen: torch.Generator) -> float:
    """Time of DECODE_STEPS decode steps over `batch` running sequences (prefill excluded)."""
    import time

    engine = Engine(model, max_num_seqs=batch, max_step_tokens=batch * DECODE_PROMPT)
    for _ in range(batch):
        ids = torch.randint(3, model.cfg.vocab_size, (DECODE_PROMPT,), generator=gen).tolist()
        engine.add(Request(ids, SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True)))
    engine.step()  # prefill all
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        engine.step()
    return time.perf_counter() - start


def hf_decode_seconds(hf, batch: int, vocab: int, gen: torch.Generator) -> float:
    import time

    from transformers import DynamicCache

    ids = torch.randint(3, vocab, (batch, DECODE_PROMPT), generator=gen)
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            out = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batches", default="1,16,64")
    args = ap.parse_args()
    from transformers import Llama4ForCausalLM

    path = resolve_model("bench-maverick")
    model = Llama4Model.load(Checkpoint(path))
    hf = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    peak = matmul_peak_gflops()

    ids = torch.randint(3, cfg.vocab_size, (PREFILL,), generator=gen).tolist()
    t_herd = median_time(lambda: herd_prefill(model, ids), runs=args.runs)
    with torch.no_grad():
        t_hf = median_time(lambda: hf(input_ids=torch.tensor([ids])), runs=args.runs)
    _, active = cfg.param_counts()
    # FLOPs that matter per prefill token: 2 x active weights except the embedding lookup
    # (the LM head runs on the last token only).
    flops = 2 * (active - 2 * cfg.vocab_size * cfg.hidden_size) * PREFILL + 2 * cfg.vocab_size * cfg.hidden_size
    rows = [["prefill 1x512", PREFILL / t_herd, PREFILL / t_hf, t_hf / t_herd]]
    for b in [int(x) for x in args.batches.split(",")]:
        herd_decode_seconds(model, b, gen)  # warm-up
        th = sorted(herd_decode_seconds(model, b, gen) for _ in range(args.runs))[args.runs // 2]
        tf = sorted(hf_decode_seconds(hf, b, cfg.vocab_size, gen) for _ in range(args.runs))[args.runs // 2]
        rows.append([f"decode batch {b}", b * DECODE_STEPS / th, b * DECODE_STEPS / tf, tf / th])
    print_table(f"bench-maverick ({cfg.num_local_experts} experts, hidden {cfg.hidden_size}, "
                f"{cfg.num_hidden_layers} layers), fp32, {torch.get_num_threads()} threads, median of {args.runs}",
                ["case", "herd tok/s", "transformers tok/s", "herd / transformers"], rows)
    achieved = flops / t_herd / 1e9
    print(f"\nfp32 matmul peak (2048^3 GEMM, this run): {peak:.1f} GFLOP/s")
    print(f"herd prefill: {achieved:.1f} GFLOP/s = {achieved / peak:.2f} of peak")


if __name__ == "__main__":
    main()
