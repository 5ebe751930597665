"""The image processor: bit-identical pixels to transformers' Llama4ImageProcessor and the same prompt as
Llama4Processor, under Meta's settings and under the settings a checkpoint's processor files give; bad
images and processor settings herd cannot honour refused."""
import hashlib
import io
import json

import pytest
import torch
from conftest import VISION, png

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


# Processor files a checkpoint may carry: (preprocessor_config.json, processor_config.json, vision image_size),
# None for an absent file. The tiny tower has 7-pixel patches (4 <|patch|> tokens per 28-pixel tile).
PROCESSOR = {"processor_class": "Llama4Processor", "patch_size": 7, "pixel_shuffle_ratio": 0.5}
KIND = {"image_processor_type": "Llama4ImageProcessor", "size": {"height": 28, "width": 28}}
META_FILE = {**KIND, "crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
             "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
             "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "input_data_format": None,
             "max_patches": 16, "processor_class": "Llama4Processor", "resample": 2,
             "rescale_factor": 0.00392156862745098, "resize_to_max_canvas": False, "return_tensors": None,
             "size": {"height": 28, "width": 28}}  # Meta's file, with the tiny tower's tile size
CLIP = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
CONFIGS = {
    "absent": (None, None, 28),
    "meta-file": (META_FILE, PROCESSOR, 28),
    "max4": ({**KIND, "max_patches": 4}, PROCESSOR, 28),
    "max4-canvas": ({**KIND, "max_patches": 4, "resize_to_max_canvas": True}, PROCESSOR, 28),
    "max16-canvas": ({**KIND, "resize_to_max_canvas": True}, PROCESSOR, 28),
    "clip-max6": ({**KIND, **CLIP, "max_patches": 6}, PROCESSOR, 28),
    "scalar-mean": ({**KIND, "image_mean": 0.3, "image_std": 0.2}, PROCESSOR, 28),
    "rescale-only": ({**KIND, "do_normalize": False, "rescale_factor": 1 / 127.5}, PROCESSOR, 28),
    "raw": ({**KIND, "do_rescale": False, "do_normalize": False, "rescale_factor": 0.5}, PROCESSOR, 28),
    "nearest": ({**KIND, "resample": 0}, PROCESSOR, 28),
    "lanczos": ({**KIND, "resample": 1, "max_patches": 8}, PROCESSOR, 28),
    "bicubic": ({**KIND, "resample": 3, "max_patches": 9}, PROCESSOR, 28),
    "tile14-max8": ({**KIND, "size": {"height": 14, "width": 14}, "max_patches": 8}, PROCESSOR, 14),
    "nested": ({**KIND, "max_patches": 12}, {**PROCESSOR, "image_processor": {**KIND, "max_patches": 2}}, 28),
    "size-unset-max4": ({"image_processor_type": "Llama4ImageProcessor", "max_patches": 4},  # Meta's 336 pixels
                        {**PROCESSOR, "patch_size": 14}, 336),
}
IMAGES = [(90, 40, "RGB", 1), (30, 70, "RGB", 2), (500, 300, "RGB", 3), (17, 90, "RGBA", 4), (64, 64, "L", 5)]


def image_png(width: int, height: int, mode: str, seed: int) -> bytes:
    """A PNG of random pixels in an RGB, RGBA or L (grey) mode."""
    from PIL import Image as PILImage

    channels = {"RGB": (3,), "RGBA": (4,), "L": ()}[mode]
    gen = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (height, width, *channels), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    PILImage.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def write_processor_files(path, config: str) -> VisionConfig:
    """The config's processor files into path; the matching tiny vision config."""
    image, processor, size = CONFIGS[config]
    for name, content in (("preprocessor_config.json", image), ("processor_config.json", processor)):
        if content is not None:
            (path / name).write_text(json.dumps(content))
    patch = (processor or {}).get("patch_size", VISION["patch_size"])
    return VisionConfig.from_hf_dict({**VISION, "image_size": size, "patch_size": patch})


def pixel_digest(pixels: torch.Tensor) -> str:
    data = pixels.contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(str(pixels.dtype).encode() + data).hexdigest()[:24]


def prompt_digest(names: list[str]) -> str:
    return f"{len(names)}:" + hashlib.sha256(" ".join(names).encode()).hexdigest()[:12]


# From tests/llama4/reference_image_digests.py: transformers' Llama4Processor.from_pretrained on a directory holding
# the config's files, on each image of IMAGES: config, image index, tile layout, pixel values' dtype and digest, digest
# of the tokens "<|image|>" became.
CONFIGURED = [
    ("absent", 0, (2, 4), "torch.bfloat16", "11063547ac5a1da3fddf485d", "47:189bde7eaf47"),
    ("absent", 1, (3, 2), "torch.bfloat16", "9d4ebc78af047ae540a5700c", "37:0e1a9737a5c6"),
    ("absent", 2, (3, 5), "torch.bfloat16", "377c9f942d0f0a2e92dda507", "82:7a9a5d538b66"),
    ("absent", 3, (4, 1), "torch.bfloat16", "aaba5d632bc90e6feea716d7", "27:cfe6ce803322"),
    ("absent", 4, (3, 3), "torch.bfloat16", "127b0b4c8335c7d52bc3a713", "52:b3a34431616b"),
    ("meta-file", 0, (2, 4), "torch.bfloat16", "11063547ac5a1da3fddf485d", "47:189bde7eaf47"),
    ("meta-file", 1, (3, 2), "torch.bfloat16", "9d4ebc78af047ae540a5700c", "37:0e1a9737a5c6"),
    ("meta-file", 2, (3, 5), "torch.bfloat16", "377c9f942d0f0a2e92dda507", "82:7a9a5d538b66"),
    ("meta-file", 3, (4, 1), "torch.bfloat16", "aaba5d632bc90e6feea716d7", "27:cfe6ce803322"),
    ("meta-file", 4, (3, 3), "torch.bfloat16", "127b0b4c8335c7d52bc3a713", "52:b3a34431616b"),
    ("max4", 0, (1, 3), "torch.bfloat16", "c5a244f46166ebd90cd22462", "22:e21ef8fcb82c"),
    ("max4", 1, (3, 1), "torch.bfloat16", "97cff012401aeac00e5a8f5a", "22:61705f8dfc2c"),
    ("max4", 2, (2, 2), "torch.bfloat16", "aebea813e8c7ab24fe35ab47", "27:798cc0dbb86c"),
    ("max4", 3, (4, 1), "torch.bfloat16", "aaba5d632bc90e6feea716d7", "27:cfe6ce803322"),
    ("max4", 4, (2, 2), "torch.bfloat16", "dc5a2b6f4b7ee3e678c22ec5", "27:798cc0dbb86c"),
    ("max4-canvas", 0, (1, 3), "torch.bfloat16", "c5a244f46166ebd90cd22462", "22:e21ef8fcb82c"),
    ("max4-canvas", 1, (3, 1), "torch.bfloat16", "97cff012401aeac00e5a8f5a", "22:61705f8dfc2c"),
    ("max4-canvas", 2, (2, 2), "torch.bfloat16", "aebea813e8c7ab24fe35ab47", "27:798cc0dbb86c"),
    ("max4-canvas", 3, (4, 1), "torch.bfloat16", "f7ed1429fc8239009d12eeb4", "27:cfe6ce803322"),
    ("max4-canvas", 4, (2, 2), "torch.bfloat16", "dc5a2b6f4b7ee3e678c22ec5", "27:798cc0dbb86c"),
    ("max16-canvas", 0, (3, 5), "torch.bfloat16", "a2424fb01a4ead4e3dffd2d8", "82:7a9a5d538b66"),
    ("max16-canvas", 1, (5, 3), "torch.bfloat16", "0b3fe9b9fe26c6fda1831f1f", "82:c24a016b3541"),
    ("max16-canvas", 2, (3, 5), "torch.bfloat16", "377c9f942d0f0a2e92dda507", "82:7a9a5d538b66"),
    ("max16-canvas", 3, (8, 2), "torch.bfloat16", "2cd07540d0d9dfe861ff7eea", "87:04fe28156cf8"),
    ("max16-canvas", 4, (4, 4), "torch.bfloat16", "c299736563bc7d310301b8e7", "87:73d5fa257ffa"),
    ("clip-max6", 0, (2, 3), "torch.bfloat16", "911f8c40fa499aadc271342e", "37:ea47bc585999"),
    ("clip-max6", 1, (3, 2), "torch.bfloat16", "898b91336febb8fa201f2df6", "37:0e1a9737a5c6"),
    ("clip-max6", 2, (2, 3), "torch.bfloat16", "8bf22030d77c588a06b76036", "37:ea47bc585999"),
    ("clip-max6", 3, (4, 1), "torch.bfloat16", "c30330993947283c4d7ee392", "27:cfe6ce803322"),
    ("clip-max6", 4, (2, 2), "torch.bfloat16", "95bead4a267e5005a55ab96a", "27:798cc0dbb86c"),
    ("scalar-mean", 0, (2, 4), "torch.bfloat16", "5c5b29a87c33ea8edfd4b655", "47:189bde7eaf47"),
    ("scalar-mean", 1, (3, 2), "torch.bfloat16", "521bcf42268a83cc757e59a3", "37:0e1a9737a5c6"),
    ("scalar-mean", 2, (3, 5), "torch.bfloat16", "e60a63b92374bca2de070bcf", "82:7a9a5d538b66"),
    ("scalar-mean", 3, (4, 1), "torch.bfloat16", "4329e2f95f5cc079f2950442", "27:cfe6ce803322"),
    ("scalar-mean", 4, (3, 3), "torch.bfloat16", "02bba78357859724097a41ba", "52:b3a34431616b"),
    ("rescale-only", 0, (2, 4), "torch.float32", "35e01a94e4c64959faca6ea8", "47:189bde7eaf47"),
    ("rescale-only", 1, (3, 2), "torch.float32", "81db972ead0445ef7fc1c06d", "37:0e1a9737a5c6"),
    ("rescale-only", 2, (3, 5), "torch.float32", "516d1a92ecee1186e5147762", "82:7a9a5d538b66"),
    ("rescale-only", 3, (4, 1), "torch.float32", "12b870163135e21c0eb72f91", "27:cfe6ce803322"),
    ("rescale-only", 4, (3, 3), "torch.float32", "a317c24e0d8846b3c72fafe5", "52:b3a34431616b"),
    ("raw", 0, (2, 4), "torch.uint8", "fa1f0e671f483186d9ba3044", "47:189bde7eaf47"),
    ("raw", 1, (3, 2), "torch.uint8", "2883f5d779a838747c28b2de", "37:0e1a9737a5c6"),
    ("raw", 2, (3, 5), "torch.uint8", "bda2c282edfc8b883d226625", "82:7a9a5d538b66"),
    ("raw", 3, (4, 1), "torch.uint8", "12abe067ea9e599d2fefda51", "27:cfe6ce803322"),
    ("raw", 4, (3, 3), "torch.uint8", "a52c7ba023eeffeb8f66218f", "52:b3a34431616b"),
    ("nearest", 0, (2, 4), "torch.bfloat16", "f15785500f59fc634fb1dc70", "47:189bde7eaf47"),
    ("nearest", 1, (3, 2), "torch.bfloat16", "354ca1944f8333e1a968e92b", "37:0e1a9737a5c6"),
    ("nearest", 2, (3, 5), "torch.bfloat16", "41f0e94acf46eaa2d7cb7dfc", "82:7a9a5d538b66"),
    ("nearest", 3, (4, 1), "torch.bfloat16", "16e3b83b9cbdb2de61aa0f96", "27:cfe6ce803322"),
    ("nearest", 4, (3, 3), "torch.bfloat16", "4c10e03fe949c68f254d98a2", "52:b3a34431616b"),
    ("lanczos", 0, (2, 4), "torch.bfloat16", "0b4eba7c68ac9a745a4750e4", "47:189bde7eaf47"),
    ("lanczos", 1, (3, 2), "torch.bfloat16", "870b3ae783e2104a946836c2", "37:0e1a9737a5c6"),
    ("lanczos", 2, (2, 4), "torch.bfloat16", "f24c3d27dc420004dcbacb6d", "47:189bde7eaf47"),
    ("lanczos", 3, (4, 1), "torch.bfloat16", "20c3934d4d279e7336dd5206", "27:cfe6ce803322"),
    ("lanczos", 4, (2, 2), "torch.bfloat16", "cb7cee8dd8d857e7f63614f3", "27:798cc0dbb86c"),
    ("bicubic", 0, (2, 4), "torch.bfloat16", "71dcfcb6f9ef773febaed12f", "47:189bde7eaf47"),
    ("bicubic", 1, (3, 2), "torch.bfloat16", "ee2a73ccc0f530a4e23be862", "37:0e1a9737a5c6"),
    ("bicubic", 2, (2, 4), "torch.bfloat16", "0989dc89bb80306fe585fa04", "47:189bde7eaf47"),
    ("bicubic", 3, (4, 1), "torch.bfloat16", "95e7eb33b87b7fd642fb5772", "27:cfe6ce803322"),
    ("bicubic", 4, (3, 3), "torch.bfloat16", "6b436368dec165859c19da4c", "52:b3a34431616b"),
    ("tile14-max8", 0, (2, 4), "torch.bfloat16", "55983a529efb8d73f817e17b", "20:0978e5ee6b4e"),
    ("tile14-max8", 1, (4, 2), "torch.bfloat16", "f5253d1b8a5777685360af1b", "20:9ca61c5c2f9d"),
    ("tile14-max8", 2, (2, 4), "torch.bfloat16", "f9a2117455057b672afeaec3", "20:0978e5ee6b4e"),
    ("tile14-max8", 3, (6, 1), "torch.bfloat16", "ace63e7e5275acab0ee92bb0", "16:51263c6ef873"),
    ("tile14-max8", 4, (2, 2), "torch.bfloat16", "51c182a531c488965ce76ba6", "12:05032e84243c"),
    ("nested", 0, (1, 2), "torch.bfloat16", "ad57950b9a652f81b610db8e", "17:0901f9041f7e"),
    ("nested", 1, (2, 1), "torch.bfloat16", "014023c21f5b3b943b1e53d7", "17:30569aa466c1"),
    ("nested", 2, (1, 2), "torch.bfloat16", "6191d1ce4c9a7d04ef2c83d1", "17:0901f9041f7e"),
    ("nested", 3, (2, 1), "torch.bfloat16", "065f6ef773f30a6f987436a4", "17:30569aa466c1"),
    ("nested", 4, (1, 1), "torch.bfloat16", "81c6a3d64f1a0c8ca369ac00", "7:52dd5089e6bf"),
    ("size-unset-max4", 0, (1, 1), "torch.bfloat16", "a22d21d8177c20f24dbba22f", "147:2d1a3280f7db"),
    ("size-unset-max4", 1, (1, 1), "torch.bfloat16", "f2c0a63da6965c2bfa3827c3", "147:2d1a3280f7db"),
    ("size-unset-max4", 2, (1, 2), "torch.bfloat16", "1bc95cb2350daa2d979adbec", "437:6551502d6f33"),
    ("size-unset-max4", 3, (1, 1), "torch.bfloat16", "57a9c781a427208054a4a9ff", "147:2d1a3280f7db"),
    ("size-unset-max4", 4, (1, 1), "torch.bfloat16", "f9571103cf07cb686f411219", "147:2d1a3280f7db"),
]


@pytest.mark.parametrize("config, image, layout, dtype, digest, prompt", CONFIGURED)
def test_the_checkpoints_processor_files_give_the_reference_pixels_and_prompt(tmp_path, config, image, layout, dtype,
                                                                              digest, prompt):
    vision = write_processor_files(tmp_path, config)
    img = ImageProcessor.from_checkpoint(tmp_path, vision)(image_png(*IMAGES[image]))
    assert img.tiles == layout and str(img.pixels.dtype) == dtype
    assert pixel_digest(img.pixels) == digest
    assert prompt_digest(expand_images([IMAGE], [img], lambda name: name, vision.tokens_per_tile)) == prompt
