"""Pure tensor functions for Llama 4: no I/O, no config parsing, no networking.

Every function is device- and dtype-agnostic; shapes are given in each module's legend.
"""
from kernels.attention import attention, temperature_scale
from kernels.experts import grouped_expert_ffn
from kernels.ffn import swiglu
from kernels.norm import qk_norm, rms_norm
from kernels.rope import apply_rope, rope_inv_freq
from kernels.routing import route_top1

__all__ = [
    "attention",
    "temperature_scale",
    "grouped_expert_ffn",
    "swiglu",
    "qk_norm",
    "rms_norm",
    "apply_rope",
    "rope_inv_freq",
    "route_top1",
]
