"""Tensors on the wire: raw little-endian bytes + dtype + shape, validated before use.

No pickle anywhere: a receiver checks the dtype against an allow-list, the shape against
what the model expects, and the byte length against the shape before touching the data.
"""
from __future__ import annotations

import math

import torch

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


class WireError(ValueError):
    """A malformed payload; servers answer INVALID_ARGUMENT with this message."""


def encode(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    if t.dtype not in _NAMES:
        raise WireError(f"dtype {t.dtype} cannot travel on the wire; allowed: {sorted(WIRE_DTYPES)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return _NAMES[t.dtype], list(t.shape), flat.view(torch.uint8).numpy().tobytes()


def decode(msg, *, dtype: torch.dtype, cols: int, max_rows: int, what: str = "x", exact: bool = False) -> torch.Tensor:
    """A [rows, cols] tensor from a herd.v1.Tensor, or WireError naming the problem.
    exact=True: an answer must have exactly max_rows rows."""
    if msg.dtype not in WIRE_DTYPES:
        raise WireError(f"{what}.dtype={msg.dtype!r} is not allowed; allowed: {sorted(WIRE_DTYPES)}")
    if WIRE_DTYPES[msg.dtype] != dtype:
        raise WireError(f"{what}.dtype={msg.dtype!r} does not match the model's compute dtype {_NAMES[dtype]!r}")
    shape = list(msg.shape)
    if len(shape) != 2 or shape[1] != cols or not 0 <= shape[0] <= max_rows or (exact and shape[0] != max_rows):
        rows = str(max_rows) if exact else f"rows <= {max_rows}"
        raise WireError(f"{what}.shape={shape} is invalid; expected [{rows}, {cols}]")
    expected = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    if len(msg.data) != expected:
        raise WireError(f"{what}: {len(msg.data)} bytes for shape {shape} and dtype {msg.dtype}; expected {expected}")
    t = torch.frombuffer(bytearray(msg.data), dtype=dtype) if expected else torch.empty(0, dtype=dtype)
    t = t.view(shape)
    if not torch.isfinite(t).all():
        raise WireError(f"{what} contains NaN or infinity")
    return t


def fill(msg, t: torch.Tensor):
    """Set a herd.v1.Tensor message from a tensor; returns the message."""
    msg.dtype, shape, msg.data = encode(t)
    msg.shape[:] = shape
    return msg
