"""RMSNorm with weight (layer norms) and without (Llama 4's qk-norm).

Legend: x [..., D], weight [D].
"""
import torch


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, cast back, then scale: the order the reference uses.
    return _rms(x, eps).type_as(x) * weight


def qk_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the head dim (HF calls it L2Norm; it is RMS: |x| = sqrt(D))."""
    return _rms(x, eps).type_as(x)
