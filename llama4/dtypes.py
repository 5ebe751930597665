"""The compute dtypes herd runs in and sends on the wire: one table, by name.

Names are what config files, command lines, wire messages and KV entries carry. torch is
imported only when a name is turned into a dtype, so a process that only reads configs
(the `herd up` driver) stays free of it.
"""
from __future__ import annotations

import functools

from llama4.errors import need

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # sorted: KV entries store the index


@functools.cache  # on every wire message: a dict lookup after the first call
def torch_dtype(name: str, field: str = "dtype"):
    """The torch dtype for a name, or HerdInputError naming the field."""
    need(name in DTYPE_NAMES, field, name, ", ".join(DTYPE_NAMES))
    import torch

    return getattr(torch, name)


@functools.cache
def dtype_name(dtype) -> str | None:
    """The table's name for a torch dtype, or None if it is not a compute dtype."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_NAMES else None
