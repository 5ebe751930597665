"""The image processor: bit-identical pixels to transformers' Llama4ImageProcessor and the same prompt as
Llama4Processor, under Meta's settings and under the settings a checkpoint's processor files give; bad
images and processor settings herd cannot honour refused."""
import hashlib
import io
import json
import re

import pytest
import torch
from conftest import VISION, png
from processor_cases import (
    CONFIGURED,
    IMAGES,
    KIND,
    META_FILE,
    image_png,
    pixel_digest,
    prompt_digest,
    write_processor_files,
)

from llama4.errors import HerdInputError
from llama4.images import ImageProcessor, decode
from llama4.vision import IMAGE, VisionConfig, expand_images

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


@pytest.mark.parametrize("config, image, layout, dtype, digest, prompt", CONFIGURED)
def test_the_checkpoints_processor_files_give_the_reference_pixels_and_prompt(tmp_path, config, image, layout, dtype,
                                                                              digest, prompt):
    vision = write_processor_files(tmp_path, config)
    img = ImageProcessor.from_checkpoint(tmp_path, vision)(image_png(*IMAGES[image]))
    assert img.tiles == layout and str(img.pixels.dtype) == dtype
    assert pixel_digest(img.pixels) == digest
    assert prompt_digest(expand_images([IMAGE], [img], lambda name: name, vision.tokens_per_tile)) == prompt


@pytest.mark.parametrize("image, processor, message", [
    ({"size": {"height": 28, "width": 56}}, {}, "size={'height': 28, 'width': 56} is invalid; allowed: {'height': 28"),
    ({"size": {"shortest_edge": 28}}, {}, "size={'shortest_edge': 28} is invalid"),
    ({"max_patches": 4}, {}, "size={'height': 336, 'width': 336} is invalid"),  # Meta's size, not this tower's
    ({**KIND, "resample": 4}, {}, "resample=4 is invalid; allowed: 0 (NEAREST), 1 (LANCZOS), 2 (BILINEAR), 3 ("),
    ({**KIND, "resample": "bilinear"}, {}, "resample='bilinear' is invalid"),
    ({**KIND, "do_resize": False}, {}, "do_resize=False is invalid; allowed: true"),
    ({**KIND, "do_rescale": False}, {}, "do_rescale=False is invalid; allowed: true while do_normalize is true"),
    ({**KIND, "do_normalize": "yes"}, {}, "do_normalize='yes' is invalid; allowed: true or false"),
    ({**KIND, "rescale_factor": 0}, {}, "rescale_factor=0 is invalid; allowed: a number > 0"),
    ({**KIND, "max_patches": 0}, {}, "max_patches=0 is invalid; allowed: an integer from 1 to 256"),
    ({**KIND, "max_patches": 257}, {}, "max_patches=257 is invalid; allowed: an integer from 1 to 256"),
    ({**KIND, "max_patches": 4.5}, {}, "max_patches=4.5 is invalid"),
    ({**KIND, "resize_to_max_canvas": 1}, {}, "resize_to_max_canvas=1 is invalid; allowed: true or false"),
    ({**KIND, "image_mean": [0.5, 0.5]}, {}, "image_mean=[0.5, 0.5] is invalid; allowed: a number or a list of 3"),
    ({**KIND, "image_std": [0.5, 0, 0.5]}, {}, "image_std=[0.5, 0, 0.5] is invalid; allowed: no zero entries"),
    ({**KIND}, {"patch_size": 14}, "patch_size=14, pixel_shuffle_ratio=0.5 give 1 <|patch|> tokens per 28-pixel tile, "
                                   "but the vision tower (config.json vision_config: patch_size=7"),
    ({**KIND}, {"pixel_shuffle_ratio": 0}, "pixel_shuffle_ratio=0 is invalid; allowed: a number in (0, 1]"),
    ({**KIND}, {"image_token": "<image>"}, "image_token='<image>' is invalid; allowed: '<|image|>'"),
    ({**KIND}, {"image_processor": [1]}, "processor_config.json: image_processor=[1] is invalid"),
    ({**KIND}, {"image_processor": {**KIND, "resample": 5}}, "processor_config.json image_processor: resample=5"),
])
def test_processor_settings_herd_cannot_honour_are_refused_naming_the_field(tmp_path, image, processor, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image))
    (tmp_path / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(HerdInputError, match=re.escape(message)):
        ImageProcessor.from_checkpoint(tmp_path, VisionConfig.from_hf_dict(VISION))


def test_unreadable_processor_files_are_refused(tmp_path):
    vision = VisionConfig.from_hf_dict(VISION)
    for name, text in (("preprocessor_config.json", "{not json"), ("processor_config.json", "[1, 2]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(HerdInputError, match=f"checkpoint: .*{name}"):
            ImageProcessor.from_checkpoint(tmp_path, vision)
        (tmp_path / name).unlink()


def test_a_checkpoint_with_processor_settings_herd_cannot_honour_is_refused_at_load(multimodal, tmp_path):
    from llama4.checkpoint import Checkpoint

    for f in multimodal[1].iterdir():
        (tmp_path / f.name).symlink_to(f)
    assert Checkpoint(tmp_path).image_processor == ImageProcessor(tile_size=28)  # no processor files: Meta's
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**KIND, "max_patches": 4, "resample": 4}))
    with pytest.raises(HerdInputError, match=re.escape("preprocessor_config.json: resample=4 is invalid")):
        Checkpoint(tmp_path)


def test_without_convert_rgb_only_rgb_images_are_taken(tmp_path):
    vision = write_processor_files(tmp_path, "meta-file")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**META_FILE, "do_convert_rgb": False}))
    plain, strict = ImageProcessor(tile_size=28), ImageProcessor.from_checkpoint(tmp_path, vision)
    assert torch.equal(strict(image_png(*IMAGES[0])).pixels, plain(image_png(*IMAGES[0])).pixels)
    for spec in IMAGES[3:]:
        with pytest.raises(HerdInputError, match=f"mode {spec[2]}; allowed: RGB images .*do_convert_rgb=false"):
            strict(image_png(*spec))


def test_a_pixel_shuffle_that_does_not_tile_the_patches_is_refused():
    with pytest.raises(HerdInputError, match=re.escape("pixel_shuffle_ratio=0.3 is invalid for 4 x 4 patches")):
        VisionConfig.from_hf_dict({**VISION, "pixel_shuffle_ratio": 0.3})
