"""Prints the tables test_images.py holds: transformers' Llama4ImageProcessor and Llama4Processor on seeded images.

The reference processor needs torchvision, which herd's .venv does not have (its torch 2.13.0 CPU wheel has
no matching torchvision build), so this runs beside it. One way, with the CUDA build of torchvision 0.28.0 and
its detection-op registrations (which need the CUDA kernels) left out, in a venv that sees .venv's packages:
  python3.11 -m venv /tmp/ref
  echo $PWD/.venv/lib/python3.11/site-packages > /tmp/ref/lib/python3.11/site-packages/herd.pth
  /tmp/ref/bin/pip install --no-deps torchvision==0.28.0
  PYTHONPATH=.:tests /tmp/ref/bin/python tests/llama4/reference_image_digests.py
"""
import hashlib
import io
import sys
import tempfile
import types
from pathlib import Path

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor  # noqa: E402
from transformers.models.llama4.processing_llama4 import Llama4Processor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from processor_cases import CONFIGS, IMAGES, image_png, pixel_digest, prompt_digest, write_processor_files  # noqa: E402

SPECIALS = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
            "<|tile_y_separator|>"]


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows Llama 4's image tokens: enough for the processor's prompt."""
    tk = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def meta_defaults():
    """Print the pixel digests of Meta's settings (test_pixels_are_the_reference_processors)."""
    sizes = [(90, 40), (30, 70), (500, 300), (336, 336), (1000, 200), (17, 900), (640, 480), (1200, 1300)]
    for i, (w, h) in enumerate(sizes):
        gen = torch.Generator().manual_seed(i)
        img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
        for tile in (28, 336):
            r = Llama4ImageProcessor(size={"height": tile, "width": tile}, max_patches=16)(images=[img],
                                                                                        return_tensors="pt")
            px = r["pixel_values"]
            digest = hashlib.sha256(px.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:32]
            print(f"    (({w}, {h}), {tile}, {tuple(r['aspect_ratios'][0].tolist())}, \"{digest}\"),")


def configured():
    """Print CONFIGURED: each config's files read by Llama4Processor.from_pretrained, on each image."""
    for config in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp)
            vision = write_processor_files(path, config)
            if CONFIGS[config][0] is None:  # no files: the reference's own defaults, for the tiny tower
                proc = Llama4Processor(Llama4ImageProcessor(size={"height": vision.image_size,
                                                                  "width": vision.image_size}),
                                       tokenizer(), patch_size=vision.patch_size)
            else:
                tokenizer().save_pretrained(path)
                proc = Llama4Processor.from_pretrained(path)
            for i, spec in enumerate(IMAGES):
                img = Image.open(io.BytesIO(image_png(*spec)))
                out = proc(text="<|image|>", images=[img], return_tensors="pt")
                names = proc.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
                px = out["pixel_values"]
                layout = tuple(proc.image_processor(images=[img])["aspect_ratios"][0].tolist())
                print(f'    ("{config}", {i}, {layout}, "{px.dtype}", "{pixel_digest(px)}", '
                      f'"{prompt_digest(names)}"),')


if __name__ == "__main__":
    meta_defaults() if sys.argv[1:] == ["meta"] else configured()
