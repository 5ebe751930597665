"""Causal grouped-query attention over a padded batch, with Llama 4's chunked local mask.

Masks are built from absolute positions, so one function serves prefill, decode against
a cache and mixed batches. Legend:
  q [B, T, Hq, D]      queries of B sequences, padded to T
  k, v [B, S, Hkv, D]  keys/values, padded to S
  q_pos [B, T]         absolute position of each query
  k_pos [B, S]         absolute position of each key, -1 for an empty slot
"""
import torch
import torch.nn.functional as F


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4 NoPE-layer query scale: 1 + attn_scale * ln(floor((p + 1) / floor_scale) + 1)."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """Returns [B, T, Hq, D]. A key is visible iff it exists, is not after the query and,
    with chunk_size, lies in the same absolute chunk of chunk_size tokens."""
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if chunk_size:
        visible &= torch.div(kp, chunk_size, rounding_mode="floor") == torch.div(qp, chunk_size, rounding_mode="floor")
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=visible[:, None, :, :],
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
