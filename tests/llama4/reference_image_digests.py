"""Prints the digests test_images.py holds: transformers' Llama4ImageProcessor on seeded random images.

The reference processor needs torchvision, which does not load beside herd's torch 2.13.0, so this
runs in a venv of its own: `pip install torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 pillow==13.0.0`.
"""
import hashlib

import torch
from PIL import Image
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

SIZES = [(90, 40), (30, 70), (500, 300), (336, 336), (1000, 200), (17, 900), (640, 480), (1200, 1300)]
for i, (w, h) in enumerate(SIZES):
    gen = torch.Generator().manual_seed(i)
    arr = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
    img = Image.fromarray(arr)
    for tile in (28, 336):
        proc = Llama4ImageProcessor(size={"height": tile, "width": tile}, max_patches=16)
        r = proc(images=[img], return_tensors="pt")
        px = r["pixel_values"]
        assert px.dtype == torch.bfloat16
        digest = hashlib.sha256(px.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:32]
        print(f"    (({w}, {h}), {tile}, {tuple(r['aspect_ratios'][0].tolist())}, \"{digest}\"),")
