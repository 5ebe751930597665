"""The image processor: bit-identical pixels to transformers' Llama4ImageProcessor, and bad images refused."""
import hashlib
import io

import pytest
import torch
from conftest import png

from llama4.errors import HerdInputError
from llama4.images import ImageProcessor, decode

# From tests/llama4/reference_image_digests.py (the reference processor, torchvision 0.29.1): image size,
# tile size, tile layout, SHA-256 of the bf16 pixel values (first 32 hex digits).
REFERENCE = [
    ((90, 40), 28, (2, 4), "69b9fcd37bdccee9ad81a585955c9f74"),
    ((90, 40), 336, (1, 1), "ae1ff2784683b966cb3f98248ad7823d"),
    ((30, 70), 28, (3, 2), "fb3e3cdd4d6e384c90ccfeb44bc4bb69"),
    ((30, 70), 336, (1, 1), "c2a10c558965fa4ff1a5c8ae4e3c7d7d"),
    ((500, 300), 28, (3, 5), "2ea2fa6df15064af3018570cfb07206f"),
    ((500, 300), 336, (1, 2), "62ebda78ca1efb628634dcc937feed34"),
    ((336, 336), 28, (4, 4), "51d76542c2f9946a4e497e1c195d74b9"),
    ((336, 336), 336, (1, 1), "01f9cd71238e245964e7ac6cd1e56cfa"),
    ((1000, 200), 28, (2, 8), "84290c772b2293357d11d8b95706b31f"),
    ((1000, 200), 336, (1, 3), "0b6148a639f8019214facbf01a47d7a5"),
    ((17, 900), 28, (16, 1), "6aa64a6d38708d26bcefab464d5c8b2b"),
    ((17, 900), 336, (3, 1), "5ae40fa835cc070b30fd57bf271dcd58"),
    ((640, 480), 28, (3, 4), "c630121450b21829029eb4ce985d1c01"),
    ((640, 480), 336, (2, 2), "1d0e439e28a1a7a396710f8085ba68ef"),
    ((1200, 1300), 28, (4, 4), "850d7a72735f8dcb5ba91233e0ab6b75"),
    ((1200, 1300), 336, (4, 4), "280d9ca97a6bfcf9cbc7cb15c09cd726"),
]
SIZES = sorted({size for size, *_ in REFERENCE}, key=[s for s, *_ in REFERENCE].index)


@pytest.mark.parametrize("size, tile, layout, digest", REFERENCE)
def test_pixels_are_the_reference_processors(size, tile, layout, digest):
    w, h = size
    gen = torch.Generator().manual_seed(SIZES.index(size))
    rgb = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).permute(2, 0, 1)
    img = ImageProcessor(tile_size=tile, max_tiles=16).preprocess(rgb)
    assert img.tiles == layout and img.pixels.dtype == torch.bfloat16
    assert hashlib.sha256(img.pixels.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:32] == digest


def test_png_and_jpeg_decode_to_rgb():
    import numpy as np
    from PIL import Image as PILImage

    data = png(40, 30, seed=3)
    rgb = decode(data, "image/png")
    assert rgb.shape == (3, 30, 40) and rgb.dtype == torch.uint8
    assert torch.equal(rgb, torch.from_numpy(np.array(PILImage.open(io.BytesIO(data)))).permute(2, 0, 1))
    buf = io.BytesIO()
    PILImage.open(io.BytesIO(data)).save(buf, "JPEG")
    assert decode(buf.getvalue(), "image/jpeg").shape == (3, 30, 40)


def test_the_same_pixels_have_the_same_digest_and_others_another():
    proc = ImageProcessor(tile_size=28)
    assert proc(png(50, 50, seed=1)).digest == proc(png(50, 50, seed=1)).digest
    assert proc(png(50, 50, seed=1)).digest != proc(png(50, 50, seed=2)).digest


@pytest.mark.parametrize("data, media_type, message", [
    (b"GIF89a....", "", "not a PNG or JPEG"),
    (b"", "", "not a PNG or JPEG"),
    (png(8, 8), "image/jpeg", "does not match the bytes, which are image/png"),
    (png(8, 8)[:40], "", "cannot decode"),
    (png(10000, 6000, mode="1"), "", "60000000 pixels; allowed: at most 50000000"),
])
def test_bad_images_are_refused(data, media_type, message):
    with pytest.raises(HerdInputError, match=message):
        ImageProcessor(tile_size=28)(data, media_type)
