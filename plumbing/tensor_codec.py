"""The tensor wire codec: a herd.v1.Tensor is raw little-endian bytes + dtype + shape.

No pickle anywhere: a reader checks the dtype against the compute-dtype table, the shape
against what the model expects and the byte length against the shape before touching the
data, and refuses non-finite values.
"""
from __future__ import annotations

import math

import torch

from llama4.dtypes import DTYPE_NAMES, dtype_name, torch_dtype

MAX_ROWS = 1 << 16  # rows in one tensor message (tokens of one MoE exchange)
ROW_OVERHEAD_BYTES = 16  # protobuf bytes per row beside the tensor: its expert id and worker (varints)
MESSAGE_OVERHEAD_BYTES = 1024  # headers, dtype, shape and field tags of one message


def rows_per_message(cols: int, dtype: torch.dtype, max_message_bytes: int) -> int:
    """How many [cols] rows of dtype one message below max_message_bytes can carry (at least 1)."""
    per_row = cols * dtype.itemsize + ROW_OVERHEAD_BYTES
    return max(1, min(MAX_ROWS, (max_message_bytes - MESSAGE_OVERHEAD_BYTES) // per_row))


class WireError(ValueError):
    """A malformed payload; servers answer INVALID_ARGUMENT with this message."""


def write_tensor(msg, t: torch.Tensor):
    """Set a herd.v1.Tensor message from a tensor; returns the message."""
    name = dtype_name(t.dtype)
    if name is None:
        raise WireError(f"dtype {t.dtype} cannot travel on the wire; allowed: {list(DTYPE_NAMES)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    msg.dtype, msg.data = name, flat.view(torch.uint8).numpy().tobytes()
    msg.shape[:] = list(t.shape)
    return msg


def read_tensor(msg, *, dtype: torch.dtype, cols: int, max_rows: int, what: str = "x",
                exact: bool = False) -> torch.Tensor:
    """A [rows, cols] tensor from a herd.v1.Tensor, or WireError naming the problem.
    exact=True: an answer must have exactly max_rows rows."""
    if msg.dtype not in DTYPE_NAMES:
        raise WireError(f"{what}.dtype={msg.dtype!r} is not allowed; allowed: {list(DTYPE_NAMES)}")
    if msg.dtype != dtype_name(dtype):
        raise WireError(f"{what}.dtype={msg.dtype!r} does not match the model's compute dtype {dtype_name(dtype)!r}")
    shape = list(msg.shape)
    if len(shape) != 2 or shape[1] != cols or not 0 <= shape[0] <= max_rows or (exact and shape[0] != max_rows):
        rows = str(max_rows) if exact else f"rows <= {max_rows}"
        raise WireError(f"{what}.shape={shape} is invalid; expected [{rows}, {cols}]")
    expected = math.prod(shape) * torch_dtype(msg.dtype).itemsize
    if len(msg.data) != expected:
        raise WireError(f"{what}: {len(msg.data)} bytes for shape {shape} and dtype {msg.dtype}; expected {expected}")
    t = torch.frombuffer(bytearray(msg.data), dtype=dtype) if expected else torch.empty(0, dtype=dtype)
    t = t.view(shape)
    if not torch.isfinite(t).all():
        raise WireError(f"{what} contains NaN or infinity")
    return t
