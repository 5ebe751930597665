"""The Llama 4 vision tower: image tiles in, one text-space embedding per `<|patch|>` position out.

Patch embedding (unfold + linear), a class token appended last, learned positions, the vision
encoder (pre-norm layers, bias everywhere, 2-D RoPE on adjacent pairs, full attention), pixel
shuffle and the two-layer GELU adapter, then the multi-modal projector into the text model's
hidden size. Legend:
  pixels [T, C, S, S]     normalised tiles (S = image_size)
  P = (S / patch)^2       patches per tile; N = P + 1 with the class token
  D, F                    vision hidden size, its MLP width; H the text hidden size
  out [T, P * r^2, H]     r = pixel_shuffle_ratio: tokens_per_tile rows per tile
The prompt side (`image_prompt`) writes the tokens those rows replace, as the reference processor does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama4.errors import HerdInputError

LAYER_NORM_EPS = 1e-5  # the reference's nn.LayerNorm default (its config's norm_eps is not used)


@dataclass(frozen=True)
class Image:
    """One image of a request, as the tower takes it: its tiles, their layout and what identifies it."""

    pixels: torch.Tensor  # [T, C, S, S]: tiles_high x tiles_wide tiles, then the global tile when T > 1
    tiles: tuple[int, int]  # (tiles_high, tiles_wide)
    digest: bytes  # of the decoded pixels: the KV cache's block hashes cover it

    @property
    def num_tiles(self) -> int:
        h, w = self.tiles
        return h * w + (1 if h * w > 1 else 0)

    @classmethod
    def of(cls, pixels: torch.Tensor, tiles: tuple[int, int]) -> Image:
        import hashlib

        data = pixels.detach().cpu().contiguous().view(torch.uint8).numpy()
        return cls(pixels, tiles, hashlib.sha256(str(pixels.dtype).encode() + data.tobytes()).digest())


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632
    vision_output_dim: int = 4096
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    rope_theta: float = 10000.0

    @classmethod
    def from_hf_dict(cls, raw: dict) -> VisionConfig:
        names = {f for f in cls.__dataclass_fields__ if f != "rope_theta"}
        kwargs = {k: raw[k] for k in names if raw.get(k) is not None}
        rope = raw.get("rope_parameters") or {}
        kwargs["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        try:
            cfg = cls(**kwargs)
        except TypeError as exc:
            raise HerdInputError(f"config.json: vision_config: {exc}") from None
        if cfg.image_size % cfg.patch_size or cfg.hidden_size % cfg.num_attention_heads:
            raise HerdInputError(f"config.json: vision_config: image_size={cfg.image_size} must be a multiple of "
                                 f"patch_size={cfg.patch_size} and hidden_size of num_attention_heads")
        r, side = cfg.pixel_shuffle_ratio, cfg.patches_per_side
        whole = isinstance(r, int | float) and not isinstance(r, bool) and 0 < r <= 1 and float(side * r).is_integer()
        if not (whole and cfg.hidden_size / r**2 == cfg.intermediate_size):
            # pixel shuffle merges a tile's side x side patches into (side * r)^2 tokens of hidden_size / r^2
            raise HerdInputError(f"config.json: vision_config: pixel_shuffle_ratio={r!r} is invalid for {side} x "
                                 f"{side} patches per tile and hidden_size={cfg.hidden_size}; allowed: a ratio in "
                                 "(0, 1] with image_size / patch_size * ratio whole and hidden_size / ratio^2 = "
                                 f"intermediate_size={cfg.intermediate_size}")
        if raw.get("vision_feature_select_strategy", "default") != "default":
            raise HerdInputError("config.json: vision_config.vision_feature_select_strategy="
                                 f"{raw['vision_feature_select_strategy']!r} is not supported; allowed: 'default'")
        return cfg

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return round(self.patches_per_side * self.pixel_shuffle_ratio) ** 2  # from_hf_dict checked it is whole


def tensor_specs(cfg: VisionConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the tower, by its name in the multimodal checkpoint."""
    d, f, c, p = cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size
    specs = {"vision_model.patch_embedding.linear.weight": (d, c * p * p),
             "vision_model.class_embedding": (d,),
             "vision_model.positional_embedding_vlm": (cfg.patches_per_side**2 + 1, d),
             "vision_model.vision_adapter.mlp.fc1.weight": (cfg.projector_input_dim, f),
             "vision_model.vision_adapter.mlp.fc2.weight": (cfg.projector_output_dim, cfg.projector_output_dim),
             "multi_modal_projector.linear_1.weight": (text_hidden, cfg.vision_output_dim)}
    for norm in ("layernorm_pre", "layernorm_post"):
        specs[f"vision_model.{norm}.weight"] = specs[f"vision_model.{norm}.bias"] = (d,)
    for layer in range(cfg.num_hidden_layers):
        q = f"vision_model.model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[q + f"self_attn.{proj}.weight"], specs[q + f"self_attn.{proj}.bias"] = (d, d), (d,)
        specs[q + "mlp.fc1.weight"], specs[q + "mlp.fc1.bias"] = (f, d), (f,)
        specs[q + "mlp.fc2.weight"], specs[q + "mlp.fc2.bias"] = (d, f), (d,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs[q + f"{norm}.weight"] = specs[q + f"{norm}.bias"] = (d,)
    return specs


@functools.cache
def rope_frequencies(patches_per_side: int, head_dim: int, theta: float) -> torch.Tensor:
    """Complex [N, head_dim / 2]: patch i rotates by its (x + 1, y + 1); the class token (last) does not."""
    n = patches_per_side**2
    x = torch.arange(n) % patches_per_side
    y = torch.arange(n) // patches_per_side
    half = head_dim // 2
    inv = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # [head_dim / 4]
    # x frequencies fill the first half of the pairs, y the second: [n, head_dim / 2]
    angles = torch.cat([(x + 1)[:, None] * inv, (y + 1)[:, None] * inv], dim=1).float()
    angles = torch.cat([angles, torch.zeros(1, half)])  # the class token
    return torch.polar(torch.ones_like(angles), angles)


def _rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t [T, N, heads, head_dim], rotating adjacent pairs (2i, 2i + 1)."""
    pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3).to(t.dtype)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[T, P, D] -> [T, P * ratio^2, D / ratio^2]: neighbouring patches merged into one token."""
    t, p, d = x.shape
    side = int(p**0.5)
    x = x.view(t, side, int(side * ratio), int(d / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(t, int(side * ratio), int(side * ratio), int(d / ratio**2)).permute(0, 2, 1, 3)
    return x.reshape(t, -1, x.shape[-1])


class VisionTower:
    def __init__(self, cfg: VisionConfig, weights: dict[str, torch.Tensor]):
        self.cfg, self.w = cfg, weights

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        heads, dtype = cfg.num_attention_heads, w["vision_model.class_embedding"].dtype
        head_dim = cfg.hidden_size // heads
        t = pixels.shape[0]
        x = F.unfold(pixels.to(dtype), kernel_size=cfg.patch_size, stride=cfg.patch_size).transpose(1, 2)
        x = F.linear(x, w["vision_model.patch_embedding.linear.weight"])  # [T, P, D]
        x = torch.cat([x, w["vision_model.class_embedding"].expand(t, 1, -1)], dim=1)  # class token last
        x = x + w["vision_model.positional_embedding_vlm"]
        x = self._norm(x, "vision_model.layernorm_pre")
        freqs = rope_frequencies(cfg.patches_per_side, head_dim, cfg.rope_theta).to(x.device)
        n = x.shape[1]
        for layer in range(cfg.num_hidden_layers):
            p = f"vision_model.model.layers.{layer}."
            h = self._norm(x, p + "input_layernorm")
            q, k, v = (F.linear(h, w[p + f"self_attn.{m}.weight"], w[p + f"self_attn.{m}.bias"]).view(t, n, heads, -1)
                       for m in ("q_proj", "k_proj", "v_proj"))
            q, k = _rotate(q, freqs), _rotate(k, freqs)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = x + F.linear(attn.transpose(1, 2).reshape(t, n, -1), w[p + "self_attn.o_proj.weight"],
                             w[p + "self_attn.o_proj.bias"])
            h = self._norm(x, p + "post_attention_layernorm")
            h = F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
            x = x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = self._norm(x, "vision_model.layernorm_post")[:, :-1]  # the class token is dropped
        x = pixel_shuffle(x, cfg.pixel_shuffle_ratio)
        x = F.gelu(F.linear(x, w["vision_model.vision_adapter.mlp.fc1.weight"]))
        x = F.gelu(F.linear(x, w["vision_model.vision_adapter.mlp.fc2.weight"]))
        return F.linear(x, w["multi_modal_projector.linear_1.weight"])  # [T, tokens_per_tile, H]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w[name + ".bias"], LAYER_NORM_EPS)


IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"


def image_prompt(tiles_high: int, tiles_wide: int, tokens_per_tile: int) -> list[str]:
    """The special tokens one image becomes in the prompt: its tiles row by row (when it has more
    than one), then the global tile after `<|image|>`. Each `<|patch|>` is one row of the tower's output."""
    out = [IMAGE_START]
    if tiles_high * tiles_wide > 1:
        for _ in range(tiles_high):
            for x in range(tiles_wide):
                out += [PATCH] * tokens_per_tile
                if x < tiles_wide - 1:
                    out.append(TILE_X)
            out.append(TILE_Y)
    return out + [IMAGE] + [PATCH] * tokens_per_tile + [IMAGE_END]


def expand_images(ids: list[int], images: list[Image], token_id, tokens_per_tile: int) -> list[int]:
    """Replace each `<|image|>` placeholder in ids by the tokens of the next image (image_prompt).
    token_id(name) gives a special token's id."""
    placeholder = token_id(IMAGE)
    count = ids.count(placeholder)
    if count != len(images):
        raise HerdInputError(f"prompt has {count} <|image|> placeholders for {len(images)} images; "
                             "allowed: one placeholder per image")
    out, it = [], iter(images)
    for t in ids:
        if t == placeholder:
            img = next(it)
            out += [token_id(name) for name in image_prompt(*img.tiles, tokens_per_tile)]
        else:
            out.append(t)
    return out
