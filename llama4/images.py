"""Image bytes in, tiles the vision tower takes out: Llama 4's image processor.

Decode (PNG or JPEG, with a pixel limit checked from the header before anything is decoded),
pick the tile layout that resizes the image least (up to `max_tiles` tiles of image_size
pixels), resize without distortion (bilinear, antialiased, on uint8 as the reference does), pad
to the layout with zeros, rescale and normalise in bf16 as the reference does, cut into tiles
and add the whole image resized to one tile when there is more than one.
"""
from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama4.errors import HerdInputError
from llama4.vision import Image

MEDIA_TYPES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
MAX_PIXELS = 50_000_000  # a larger image is refused before decoding (decompression bombs)
MAX_IMAGES = 8  # per prompt (Meta tested Llama 4 with up to 8)
MEAN = STD = 0.5


@dataclass(frozen=True)
class ImageProcessor:
    tile_size: int = 336  # the vision tower's image_size
    max_tiles: int = 16  # the reference processor's max_patches
    resize_to_max_canvas: bool = False
    max_pixels: int = MAX_PIXELS

    def __call__(self, data: bytes, media_type: str = "") -> Image:
        return self.preprocess(decode(data, media_type, self.max_pixels))

    def preprocess(self, rgb: torch.Tensor) -> Image:
        """rgb uint8 [3, H, W] -> the image's tiles, its layout and digest."""
        h, w = rgb.shape[-2:]
        canvas = best_canvas((h, w), supported_canvases(self.max_tiles, self.tile_size), self.resize_to_max_canvas)
        limit = canvas if self.resize_to_max_canvas else (min(max(h, self.tile_size), canvas[0]),
                                                          min(max(w, self.tile_size), canvas[1]))
        new_h, new_w = size_without_distortion((h, w), limit)
        resized = _resize(rgb, (max(new_h, 1), max(new_w, 1)))
        padded = F.pad(resized, (0, canvas[1] - resized.shape[-1], 0, canvas[0] - resized.shape[-2]))
        tiles_h, tiles_w = canvas[0] // self.tile_size, canvas[1] // self.tile_size
        tiles = _tiles(_normalise(padded), tiles_h, tiles_w)
        if tiles_h * tiles_w > 1:
            whole = _normalise(_resize(rgb, (self.tile_size, self.tile_size)))
            tiles = torch.cat([tiles, whole[None]])
        return Image.of(tiles, (tiles_h, tiles_w))


def decode(data: bytes, media_type: str = "", max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """PNG or JPEG bytes -> uint8 [3, H, W] (RGB). The format comes from the bytes; a declared media
    type must agree with them."""
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
        rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError) as exc:
        if isinstance(exc, HerdInputError):
            raise
        raise HerdInputError(f"image: cannot decode the {kind} bytes: {exc}") from None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every (height, width) of up to max_tiles tiles, grouped by aspect ratio as the reference orders them."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for f in sorted({d for i in range(1, int(n**0.5) + 1) if n % i == 0 for d in (i, n // i)}):
            by_ratio[f / (n // f)].append((f, n // f))
    return [(h * tile, w * tile) for layouts in by_ratio.values() for h, w in layouts]


def best_canvas(size: tuple[int, int], canvases: list[tuple[int, int]], to_max: bool) -> tuple[int, int]:
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


def _resize(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(rgb[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _normalise(rgb: torch.Tensor) -> torch.Tensor:
    x = rgb.to(torch.bfloat16) * (1 / 255)  # bf16, as the reference processor rescales and normalises
    return (x - MEAN) / STD


def _tiles(img: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """[C, H, W] -> [tiles_h * tiles_w, C, H / tiles_h, W / tiles_w], row by row."""
    c, h, w = img.shape
    return (img.view(c, tiles_h, h // tiles_h, tiles_w, w // tiles_w).permute(1, 3, 0, 2, 4)
            .reshape(tiles_h * tiles_w, c, h // tiles_h, w // tiles_w))


def with_images(ids: list[int], blobs: list[tuple[bytes, str]], vision, token_id, max_images: int,
                processor: ImageProcessor | None = None) -> tuple[list[int], tuple[Image, ...]]:
    """A prompt's ids with each <|image|> placeholder expanded, and its images decoded and tiled.
    blobs: (bytes, media type) per image, in placeholder order; vision: the model's VisionTower or None."""
    from llama4.vision import expand_images

    if vision is None:
        if blobs:
            raise HerdInputError("this model has no vision tower; allowed: text prompts")
        return ids, ()
    if not blobs:  # a vision model still checks placeholders: an <|image|> without its image is refused
        return expand_images(ids, [], token_id, vision.cfg.tokens_per_tile), ()
    if len(blobs) > max_images:
        raise HerdInputError(f"the prompt has {len(blobs)} images; allowed: at most {max_images}")
    processor = processor or ImageProcessor(tile_size=vision.cfg.image_size)
    images = tuple(processor(data, media_type) for data, media_type in blobs)
    return expand_images(ids, list(images), token_id, vision.cfg.tokens_per_tile), images
