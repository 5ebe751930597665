"""Image processor configurations a checkpoint may carry, and what transformers' Llama4Processor makes of
seeded images under each (CONFIGURED, printed by tests/llama4/reference_image_digests.py)."""
import hashlib
import io
import json

import torch
from conftest import VISION

from llama4.vision import VisionConfig

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


def reference(config: str, image: int) -> tuple:
    """CONFIGURED's row for one config and image: (layout, dtype, pixel digest, prompt digest)."""
    (row,) = [r[2:] for r in CONFIGURED if r[:2] == (config, image)]
    return row


def checkpoint_with(config: str, source, out):
    """out: the checkpoint at source (linked, not copied) with the config's processor files instead of its own."""
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name not in ("preprocessor_config.json", "processor_config.json"):
            (out / f.name).symlink_to(f)
    write_processor_files(out, config)
    return out


def image_runs(ids: list[int], token_id) -> list[list[str]]:
    """The special tokens of each image in a prompt's ids, <|image_start|> to <|image_end|>, by name."""
    names = {token_id(n): n for n in ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                                       "<|tile_x_separator|>", "<|tile_y_separator|>")}
    runs, run = [], None
    for t in ids:
        if names.get(t) == "<|image_start|>":
            run = []
        if run is not None:
            run.append(names.get(t, str(t)))
        if names.get(t) == "<|image_end|>":
            runs.append(run)
            run = None
    return runs
