"""Interleaved (complex-pair) rotary embeddings with optional llama3 frequency scaling.

Llama 4 rotates dims (2j, 2j+1) as one complex number; HF checkpoints keep that layout,
so a rotate-half (NeoX) RoPE on unpermuted weights is wrong.
Legend: x [N, heads, D], positions [N], inv_freq [D/2].
"""
import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Per-pair angular frequencies omega_j = theta^(-2j/D), scaled as llama3 when asked."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    if high != low and bool(medium.any()):
        # Smooth band between the two wavelengths; absent when low == high (Scout), where a
        # naive formula would divide by zero.
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of x by positions * inv_freq[j], computed in fp32."""
    angles = positions.float()[:, None] * inv_freq.to(x.device)[None, :]  # [N, D/2]
    cos = torch.cos(angles)[:, None, :]
    sin = torch.sin(angles)[:, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))  # [N, heads, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
