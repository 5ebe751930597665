"""Image bytes in, tiles the vision tower takes out: Llama 4's image processor.

Decode (PNG or JPEG, with a pixel limit checked from the header before anything is decoded;
transparency composited onto white), pick the tile layout that resizes the image least (up to
`max_tiles` tiles of tile_size pixels), resize without distortion (antialiased, on uint8 as the
reference does), pad to the layout with zeros, rescale and normalise (in bf16 when both are on,
as the reference does), cut into tiles and add the whole image resized to one tile when there is
more than one. The settings come from the checkpoint's preprocessor_config.json and
processor_config.json (`ImageProcessor.from_checkpoint`); what herd cannot honour is refused at load.
"""
from __future__ import annotations

import functools
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llama4.errors import HerdInputError, need
from llama4.vision import IMAGE, IMAGE_END, IMAGE_START, PATCH, TILE_X, TILE_Y, Image, VisionConfig

MEDIA_TYPES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
MAX_PIXELS = 50_000_000  # a larger image is refused before decoding (decompression bombs)
MAX_IMAGES = 8  # per prompt (Meta tested Llama 4 with up to 8)
MEAN = STD = (0.5, 0.5, 0.5)  # Meta's
META_TILE = 336  # the reference's size when its file does not set one
MAX_TILES = 256  # herd's bound on max_patches (Meta's is 16): tiles of one image, each a run of the tower
# PIL's resampling codes, as the reference maps them onto torch's modes; BOX (4) and HAMMING (5) it cannot run.
RESAMPLE = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
PIL_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
ANTIALIASED = {"lanczos", "bilinear", "bicubic"}
# processor_config.json's token names: herd writes Llama 4's own, so only these are accepted.
PROCESSOR_TOKENS = {"fake_image_token": IMAGE, "image_token": IMAGE, "start_of_image_token": IMAGE_START,
                    "end_of_image_token": IMAGE_END, "patch_token": PATCH, "tile_x_separator_token": TILE_X,
                    "tile_y_separator_token": TILE_Y}


@dataclass(frozen=True)
class ImageProcessor:
    """The reference processor's settings; the defaults are Meta's (a checkpoint without processor files)."""

    tile_size: int = 336  # size: height = width = the vision tower's image_size
    max_tiles: int = 16  # max_patches
    resize_to_max_canvas: bool = False  # upscale to the largest canvas, not the least one
    resample: int = 2  # a PIL code from RESAMPLE
    rescale_factor: float | None = 1 / 255  # None: do_rescale is off
    image_mean: tuple[float, ...] | None = MEAN  # None: do_normalize is off; one value or one per channel
    image_std: tuple[float, ...] = STD
    convert_rgb: bool = True  # off: only RGB images are taken (the reference would pass on other channels)
    max_pixels: int = MAX_PIXELS

    @classmethod
    def from_checkpoint(cls, path: str | Path, vision: VisionConfig) -> ImageProcessor:
        """The processor a checkpoint directory's processor files describe, for its vision tower."""
        from llama4.checkpoint import read_processor_configs

        image, where, processor = read_processor_configs(path)
        return cls.from_configs(image, processor, vision, where)

    @classmethod
    def from_configs(cls, image: dict | None, processor: dict, vision: VisionConfig,
                     where: str = "preprocessor_config.json") -> ImageProcessor:
        """image: the image processor's settings (from `where`), None for a checkpoint without them (Meta's
        settings on tiles of the tower's image_size); processor: processor_config.json's."""
        tile = vision.image_size if image is None else META_TILE
        image = image or {}
        get = lambda key, default: default if image.get(key) is None else image[key]
        flags = {key: get(key, True) for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")}
        for key, value in flags.items():
            need(isinstance(value, bool), key, value, "true or false", where)
        need(flags["do_resize"], "do_resize", False, "true (Llama 4 always resizes to its tile layout)", where)
        size = get("size", {"height": tile, "width": tile})
        need(isinstance(size, dict) and set(size) == {"height", "width"} and size["height"] == size["width"]
             == vision.image_size, "size", size,
             f"{{'height': {vision.image_size}, 'width': {vision.image_size}}} (square tiles of "
             "config.json's vision_config.image_size)", where)
        max_tiles = get("max_patches", 16)
        need(_is_int(max_tiles) and 1 <= max_tiles <= MAX_TILES, "max_patches", max_tiles,
             f"an integer from 1 to {MAX_TILES}", where)
        to_max = get("resize_to_max_canvas", False)
        need(isinstance(to_max, bool), "resize_to_max_canvas", to_max, "true or false", where)
        resample = get("resample", 2)
        need(_is_int(resample) and resample in RESAMPLE, "resample", resample,
             ", ".join(f"{code} ({PIL_NAMES[code]})" for code in RESAMPLE), where)
        factor = get("rescale_factor", 1 / 255)
        need(_is_number(factor) and factor > 0, "rescale_factor", factor, "a number > 0", where)
        # Normalising uint8 pixels is what the reference cannot do: it fails on every image.
        need(flags["do_rescale"] or not flags["do_normalize"], "do_rescale", False,
             "true while do_normalize is true", where)
        mean = _channels(get("image_mean", list(MEAN)), "image_mean", vision.num_channels, where)
        std = _channels(get("image_std", list(STD)), "image_std", vision.num_channels, where)
        need(all(s != 0 for s in std), "image_std", image.get("image_std"), "no zero entries", where)
        _check_processor(processor, vision)
        return cls(tile_size=vision.image_size, max_tiles=max_tiles, resize_to_max_canvas=to_max, resample=resample,
                   rescale_factor=float(factor) if flags["do_rescale"] else None,
                   image_mean=mean if flags["do_normalize"] else None, image_std=std,
                   convert_rgb=flags["do_convert_rgb"])

    def __call__(self, data: bytes, media_type: str = "") -> Image:
        return self.preprocess(decode(data, media_type, self.max_pixels, self.convert_rgb))

    def preprocess(self, rgb: torch.Tensor) -> Image:
        """rgb uint8 [3, H, W] -> the image's tiles, its layout and digest."""
        h, w = rgb.shape[-2:]
        canvas = best_canvas((h, w), supported_canvases(self.max_tiles, self.tile_size), self.resize_to_max_canvas)
        limit = canvas if self.resize_to_max_canvas else (min(max(h, self.tile_size), canvas[0]),
                                                          min(max(w, self.tile_size), canvas[1]))
        new_h, new_w = size_without_distortion((h, w), limit)
        resized = self._resize(rgb, (max(new_h, 1), max(new_w, 1)))
        padded = F.pad(resized, (0, canvas[1] - resized.shape[-1], 0, canvas[0] - resized.shape[-2]))
        tiles_h, tiles_w = canvas[0] // self.tile_size, canvas[1] // self.tile_size
        tiles = _tiles(self._normalise(padded), tiles_h, tiles_w)
        if tiles_h * tiles_w > 1:
            whole = self._normalise(self._resize(rgb, (self.tile_size, self.tile_size)))
            tiles = torch.cat([tiles, whole[None]])
        return Image.of(tiles, (tiles_h, tiles_w))

    def _resize(self, rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(rgb.shape[-2:]) == size:
            return rgb  # the reference leaves an image of the right size untouched
        mode = RESAMPLE[self.resample]
        smooth = mode in ANTIALIASED
        return F.interpolate(rgb[None], size=size, mode=mode, antialias=smooth,
                             align_corners=False if smooth else None)[0]

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> what the reference hands the tower: bf16 when it rescales and normalises (both
        in bf16, the mean and std rounded to bf16 too), fp32 when it only rescales, uint8 when it does neither."""
        if self.rescale_factor is None:
            return pixels
        if self.image_mean is None:
            return pixels * self.rescale_factor
        x = pixels.to(torch.bfloat16) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _channels(value, field: str, channels: int, where: str) -> tuple[float, ...]:
    """image_mean / image_std: one number for every channel, or one per channel."""
    values = value if isinstance(value, list) else [value]
    need(len(values) in (1, channels) and all(_is_number(v) for v in values), field, value,
         f"a number or a list of {channels} numbers", where)
    return tuple(float(v) for v in values)


def _check_processor(processor: dict, vision: VisionConfig) -> None:
    """processor_config.json: Llama 4's own image tokens, and as many <|patch|> tokens per tile as the tower gives."""
    where = "processor_config.json"
    for key, token in PROCESSOR_TOKENS.items():
        need(processor.get(key) in (None, token), key, processor.get(key), repr(token), where)
    patch = processor.get("patch_size", vision.patch_size)
    ratio = processor.get("pixel_shuffle_ratio", vision.pixel_shuffle_ratio)
    need(_is_int(patch) and patch >= 1, "patch_size", patch, "an integer >= 1", where)
    need(_is_number(ratio) and 0 < ratio <= 1, "pixel_shuffle_ratio", ratio, "a number in (0, 1]", where)
    per_tile = (vision.image_size // patch) ** 2 // round(1 / ratio**2)  # how the reference counts them
    if per_tile != vision.tokens_per_tile:
        raise HerdInputError(
            f"{where}: patch_size={patch}, pixel_shuffle_ratio={ratio} give {per_tile} <|patch|> tokens per "
            f"{vision.image_size}-pixel tile, but the vision tower (config.json vision_config: patch_size="
            f"{vision.patch_size}, pixel_shuffle_ratio={vision.pixel_shuffle_ratio}) gives {vision.tokens_per_tile}; "
            "allowed: values that agree with vision_config")


def decode(data: bytes, media_type: str = "", max_pixels: int = MAX_PIXELS, convert_rgb: bool = True) -> torch.Tensor:
    """PNG or JPEG bytes -> uint8 [3, H, W] (RGB). The format comes from the bytes; a declared media
    type must agree with them. Without convert_rgb only RGB images are taken."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    kind = next((t for t, magic in MEDIA_TYPES.items() if data.startswith(magic)), None)
    if kind is None:
        raise HerdInputError(f"image: the bytes are not a PNG or JPEG image (they start {data[:8]!r}); "
                             f"allowed: {', '.join(MEDIA_TYPES)}")
    if media_type and media_type != kind:
        raise HerdInputError(f"image: media type {media_type!r} does not match the bytes, which are {kind}")
    try:
        img = PILImage.open(io.BytesIO(data))
        w, h = img.size  # from the header: nothing decoded yet
        if w * h > max_pixels:
            raise HerdInputError(f"image: {w} x {h} = {w * h} pixels; allowed: at most {max_pixels}")
        if not convert_rgb and img.mode != "RGB":
            raise HerdInputError(f"image: mode {img.mode}; allowed: RGB images (this model's "
                                 "preprocessor_config.json has do_convert_rgb=false)")
        rgb = _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError) as exc:
        if isinstance(exc, HerdInputError):
            raise
        raise HerdInputError(f"image: cannot decode the {kind} bytes: {exc}") from None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def _to_rgb(img):
    """A PIL image in RGB, any transparency composited onto white (as the reference does)."""
    from PIL import Image as PILImage

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = PILImage.new("RGBA", img.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


@functools.cache
def supported_canvases(max_tiles: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width) of up to max_tiles tiles, grouped by aspect ratio as the reference orders them."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for f in sorted({d for i in range(1, int(n**0.5) + 1) if n % i == 0 for d in (i, n // i)}):
            by_ratio[f / (n // f)].append((f, n // f))
    return tuple((h * tile, w * tile) for layouts in by_ratio.values() for h, w in layouts)


def best_canvas(size: tuple[int, int], canvases: tuple[tuple[int, int], ...], to_max: bool) -> tuple[int, int]:
    """The canvas needing the least upscaling (or, if none fits, the least downscaling); the smallest on ties."""
    h, w = size
    scales = [min(ch / h, cw / w) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = (max(up) if to_max else min(up)) if up else max(s for s in scales if s < 1)
    ties = [c for c, s in zip(canvases, scales, strict=True) if s == chosen]
    return min(ties, key=lambda c: c[0] * c[1])


def size_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    th, tw = target
    if tw / w < th / h:
        return min(math.floor(h * tw / w), th), tw
    return th, min(math.floor(w * th / h), tw)


def _tiles(img: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """[C, H, W] -> [tiles_h * tiles_w, C, H / tiles_h, W / tiles_w], row by row."""
    c, h, w = img.shape
    return (img.view(c, tiles_h, h // tiles_h, tiles_w, w // tiles_w).permute(1, 3, 0, 2, 4)
            .reshape(tiles_h * tiles_w, c, h // tiles_h, w // tiles_w))


def with_images(ids: list[int], blobs: list[tuple[bytes, str]], vision, token_id, max_images: int,
                processor: ImageProcessor | None) -> tuple[list[int], tuple[Image, ...]]:
    """A prompt's ids with each <|image|> placeholder expanded, and its images decoded and tiled.
    blobs: (bytes, media type) per image, in placeholder order; vision: the model's VisionTower or None;
    processor: the checkpoint's (ImageProcessor.from_checkpoint), None with no tower."""
    from llama4.vision import expand_images

    if vision is None:
        if blobs:
            raise HerdInputError("this model has no vision tower; allowed: text prompts")
        return ids, ()
    if not blobs:  # a vision model still checks placeholders: an <|image|> without its image is refused
        return expand_images(ids, [], token_id, vision.cfg.tokens_per_tile), ()
    if len(blobs) > max_images:
        raise HerdInputError(f"the prompt has {len(blobs)} images; allowed: at most {max_images}")
    images = tuple(processor(data, media_type) for data, media_type in blobs)
    return expand_images(ids, list(images), token_id, vision.cfg.tokens_per_tile), images
