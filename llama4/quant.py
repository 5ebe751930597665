"""Quantized checkpoints and quantized experts: what herd reads and what it keeps in memory.

A checkpoint's `quantization_config` (compressed-tensors, as Meta's Maverick FP8 release) is
read leniently (later versions add fields) but every setting that changes the numbers is
checked: FP8-E4M3 weights, symmetric, static, one scale per output channel; activations FP8
per token and dynamic, or none. Anything else is refused rather than dequantized wrong.

`expert_dtype` says how a process holds routed experts: as stored (`auto`), in the compute
dtype (`compute`), or quantized at load to `fp8`, `int8` (per channel) or `int4` (per group of
128 inputs, the usual W4A16 layout; `int4-g64`, `int4-g32` for smaller groups).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from llama4.errors import HerdInputError

EXPERT_DTYPES = ("auto", "compute", "fp8", "int8", "int4", "int4-g64", "int4-g32")
# Inputs per int4 scale and zero. 128 (0.53 bytes/parameter) is what fits Scout on one 80 GB GPU, as Meta ships
# it; smaller groups cost more bytes (g32: 0.63) for accuracy: on the tiny default model g32 keeps perplexity
# within 3% of fp32 where g128 loses ~10% (a 135M model; large models lose far less at g128).
INT4_GROUP = 128

_WEIGHTS = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "channel", "dynamic": False}
_ACTIVATIONS = {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}
_FORMATS = ("float-quantized", "naive-quantized")  # naive: the same tensors, written without packing


@dataclass(frozen=True)
class QuantSpec:
    """A checkpoint's FP8 quantization: which modules stay unquantized, and how activations were meant to run."""

    ignore: tuple[str, ...]
    dynamic_fp8_activations: bool

    @classmethod
    def read(cls, raw: dict | None) -> QuantSpec | None:
        if not raw:
            return None
        where = "config.json: quantization_config"
        if not isinstance(raw, dict):
            raise HerdInputError(f"{where} must be an object, got {type(raw).__name__}")
        method = raw.get("quant_method")
        if method != "compressed-tensors":
            raise HerdInputError(f"{where}.quant_method={method!r} is not supported; allowed: 'compressed-tensors' "
                                 "(FP8 experts, as in Llama-4-Maverick-17B-128E-Instruct-FP8)")
        _check_format(raw.get("format"), f"{where}.format")
        for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if raw.get(key):
                raise HerdInputError(f"{where}.{key} is not supported; allowed: absent or empty")
        groups = raw.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise HerdInputError(f"{where}.config_groups must name at least one group")
        dynamic = []
        for name, group in groups.items():
            at = f"{where}.config_groups.{name}"
            if not isinstance(group, dict):
                raise HerdInputError(f"{at} must be an object")
            _check_format(group.get("format"), f"{at}.format")
            _check_args(group.get("weights"), _WEIGHTS, f"{at}.weights", required=True)
            if group.get("output_activations"):
                raise HerdInputError(f"{at}.output_activations is not supported; allowed: null")
            acts = group.get("input_activations")
            _check_args(acts, _ACTIVATIONS, f"{at}.input_activations", required=False)
            dynamic.append(bool(acts))
        ignore = raw.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise HerdInputError(f"{where}.ignore must be a list of module names")
        return cls(ignore=tuple(ignore), dynamic_fp8_activations=all(dynamic))

    def check_ignore(self, tensor_names: set[str]) -> None:
        """Every module the ignore list names exists (a misspelt name would leave a module unaccounted for)."""
        modules = {n.rsplit(".", 1)[0] for n in tensor_names}
        for entry in self.ignore:
            if entry.startswith("re:"):
                pattern = re.compile(entry[3:])
                found = any(pattern.match(m) for m in modules)
            else:
                found = entry in modules
            if not found:
                raise HerdInputError(f"config.json: quantization_config.ignore names module {entry!r}, "
                                     "which is not in the checkpoint")


def _check_format(value, at: str) -> None:
    if value is not None and value not in _FORMATS:
        raise HerdInputError(f"{at}={value!r} is not supported; allowed: {list(_FORMATS)}")


def _check_args(args, expected: dict, at: str, required: bool) -> None:
    if args is None:
        if required:
            raise HerdInputError(f"{at} is missing; allowed: {expected}")
        return
    if not isinstance(args, dict):
        raise HerdInputError(f"{at} must be an object")
    for key, want in expected.items():
        got = args.get(key, want if key == "symmetric" else None)
        if got != want:
            raise HerdInputError(f"{at}.{key}={got!r} is not supported; allowed: {want!r} "
                                 f"(herd reads FP8-E4M3 weights with per-channel scales)")
    if args.get("group_size") is not None:
        raise HerdInputError(f"{at}.group_size={args['group_size']!r} is not supported; allowed: null")


def resolve_expert_dtype(expert_dtype: str, stored_fp8: bool) -> str:
    """`auto` -> what the checkpoint stores: `fp8` for an FP8 checkpoint, else `compute`."""
    if expert_dtype not in EXPERT_DTYPES:
        raise HerdInputError(f"expert_dtype={expert_dtype!r} is not supported; allowed: {', '.join(EXPERT_DTYPES)}")
    if expert_dtype == "auto":
        return "fp8" if stored_fp8 else "compute"
    return expert_dtype


def int4_group(expert_dtype: str) -> int:
    """Inputs per int4 scale: INT4_GROUP unless the name says otherwise (int4-g32)."""
    return int(expert_dtype.split("-g")[1]) if "-g" in expert_dtype else INT4_GROUP


def serving_fingerprint(weights: str, expert_dtype: str, stored_fp8: bool) -> str:
    """What the router and the KV tier compare: the weights, plus how experts are held when that is not
    as stored (int4 experts produce other hidden states, so their KV must not mix with fp32 experts')."""
    resolved = resolve_expert_dtype(expert_dtype, stored_fp8)
    if resolved == resolve_expert_dtype("auto", stored_fp8):
        return weights
    return hashlib.sha256(f"{weights}|experts={resolved}".encode()).hexdigest()
