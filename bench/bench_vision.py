"""The vision tower's cost: images per second at 1 and 4 tiles, and the time to first token of a
one-image prompt against the same prompt without its image, side by side in one run.

The tower is Scout's vision config (hidden 1408, 16 heads, MLP 5632, 336 px tiles of 14 px patches,
4096-wide projector) with --layers of its 34 encoder layers (random weights; time scales with layers),
projecting into bench-maverick's text model. Run: .venv/bin/python -m bench.bench_vision [--layers 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import print_table
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import resolve_model
from llama4.vision import Image, VisionConfig, VisionTower, image_prompt, tensor_specs

PATCH, OTHER = 31999, 31998  # bench-maverick has a 32,000 vocabulary: stand-ins for <|patch|> and the rest


def tower(layers: int, text_hidden: int) -> VisionTower:
    cfg = VisionConfig(num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(0)
    w = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in tensor_specs(cfg, text_hidden).items()}
    return VisionTower(cfg, w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model = Llama4Model.load(Checkpoint(resolve_model("bench-maverick")))
    model.vision, model.image_token_id = tower(args.layers, model.cfg.hidden_size), PATCH
    per_tile = model.vision.cfg.tokens_per_tile
    gen = torch.Generator().manual_seed(1)
    rows = []
    for tiles, layout in ((1, (1, 1)), (5, (2, 2))):
        pixels = torch.randn(tiles, 3, 336, 336, generator=gen)
        with torch.inference_mode():
            model.vision(pixels)
            seconds = statistics.median(_timed(lambda p=pixels: model.vision(p)) for _ in range(args.runs))
        rows.append([f"{layout[0]} x {layout[1]} image ({tiles} tile{'s' * (tiles > 1)})", seconds, 1 / seconds])
    print_table(f"vision tower: Scout's config with {args.layers} of 34 layers, fp32, median of {args.runs}",
                ["image", "seconds", "images/s"], rows)

    text = torch.randint(3, 32000, (64,), generator=gen).tolist()
    image = Image.of(torch.randn(1, 3, 336, 336, generator=gen), (1, 1))
    with_image = text[:32] + [PATCH if t == "<|patch|>" else OTHER for t in image_prompt(1, 1, per_tile)] + text[32:]
    ttft = {"text only (64 tokens)": [], f"with the image ({len(with_image)} tokens)": []}
    for _ in range(args.runs):
        for name, ids, images in (("text only (64 tokens)", text, ()),
                                  (f"with the image ({len(with_image)} tokens)", with_image, (image,))):
            engine = Engine(model)
            start = time.perf_counter()
            engine.add(Request(ids, SamplingParams(max_tokens=1), images=images))
            while engine.has_work:
                engine.step()
            ttft[name].append(time.perf_counter() - start)
    base = statistics.median(ttft["text only (64 tokens)"])
    print_table("time to first token, bench-maverick text model, one sequence", ["prompt", "TTFT s", "/ text only"],
                [[name, statistics.median(v), statistics.median(v) / base] for name, v in ttft.items()])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
