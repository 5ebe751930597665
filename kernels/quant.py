"""Quantized routed-expert weights: quantization math, per-expert matmuls, and the kernel choice.

An expert bank holds one matrix of every expert a process serves and computes `rows @ W_e`.
Every bank stores the checkpoint's [out, in] orientation (what torch's packed kernels and FP8
GEMMs take, and what MKL's small-M GEMMs run fastest against); the dense bank shows it as
herd's [in, out] through a transposed view. Legend:
  rows [M, K]          inputs of one expert (K = in features)
  q [E, N, K]          quantized weights, N = out features
  scale [E, N]         per output channel (fp8, int8); int4 has one scale and zero per group of K
Scales are applied in fp32 on the output (y = (x @ q.T) * scale): the same value as dequantizing
the weight first, without building a scaled copy.

Which kernel runs a quantized bank is measured, not assumed: `choose_kernel` times every
candidate that exists on the device on the bank's shape (and checks it against the fp32
dequantized result), and one kernel serves every row count of that shape, so a request's
numbers never depend on what it is batched with.
"""
from __future__ import annotations

import functools
import time
from typing import Protocol

import numpy as np
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
_CALIBRATION_ROWS = (1, 8)  # decode: a MoE layer sends each expert a few rows per step
_TOLERANCE = 3e-2  # relative, against the fp32 dequantized product: bf16 activations pass, a wrong layout fails


# ---- quantization (weights [N, K], fp32) ----

def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric E4M3, as compressed-tensors' minmax observer writes it."""
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 in [-127, 127]."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit, torch's convention: w ~ (q - 8) * scale + zero, q in [0, 15].

    Returns q [N, K] uint8 (one value per byte), scale and zero [N, K / group].
    """
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    # Scales and zeros are held in bf16 (the packed kernels' dtype): round them first and quantize
    # against the rounded values, so every kernel computes the same weights.
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = ((g - (zero - 8 * scale)[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scale.shape[1]
    w = (q.reshape(n, groups, k // groups).float() - 8) * scale[..., None].float() + zero[..., None].float()
    return w.reshape(n, k)


# FP8 -> fp32 through a 256-entry table: several times faster on the CPU than torch's own cast.
_FP8_TABLE = torch.arange(256, dtype=torch.uint8).view(FP8).float().numpy()


def fp8_to_float(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact E4M3 -> dtype (every E4M3 value is representable in fp32 and bf16)."""
    if q.device.type == "cpu" and dtype == torch.float32:
        return torch.from_numpy(np.take(_FP8_TABLE, q.contiguous().view(torch.uint8).numpy()))
    return q.to(dtype)


# ---- banks ----

def _dtype_label(t: torch.Tensor) -> str:
    return {FP8: "fp8", torch.int8: "int8"}.get(t.dtype, str(t.dtype).removeprefix("torch."))


def _bytes(*tensors: torch.Tensor) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        out[_dtype_label(t)] = out.get(_dtype_label(t), 0) + t.numel() * t.element_size()
    return out


class ExpertBank(Protocol):
    """One matrix of every expert a process serves."""

    kernel: str
    num_experts: int

    def mm(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """rows @ W_e in rows' dtype."""

    def mm_grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows sorted by expert, counts [E] rows of each: every expert's block @ its W_e, in rows' order."""

    def nbytes(self) -> dict[str, int]:
        """Resident bytes by storage dtype."""


_GROUPED_ALIGN = 16  # bytes: torch._grouped_mm takes rows, strides and data pointers aligned to this


def _grouped_mm_takes(w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can run `rows @ w[e]` on the bank w [E, K, N] as it is stored
    (each expert row-major [K, N] or column-major, i.e. [N, K] contiguous)."""
    if not hasattr(torch, "_grouped_mm") or w.dim() != 3:
        return False
    e, k, n = w.shape
    if w.stride() not in ((k * n, n, 1), (k * n, 1, k)):
        return False
    if (k * w.element_size()) % _GROUPED_ALIGN or (n * w.element_size()) % _GROUPED_ALIGN \
            or w.data_ptr() % _GROUPED_ALIGN:
        return False
    return _grouped_mm_works(w.device.type, w.dtype)


@functools.cache
def _grouped_mm_works(device: str, dtype: torch.dtype) -> bool:
    """One probe per device type and dtype: torch builds _grouped_mm for only some of them."""
    try:
        a = torch.ones(3, 8, dtype=dtype, device=device)
        b = torch.arange(3 * 8 * 4, dtype=dtype, device=device).reshape(3, 8, 4)
        y = torch._grouped_mm(a, b, offs=torch.tensor([1, 1, 3], dtype=torch.int32, device=device))
        want = torch.cat([a[:1] @ b[0], a[1:] @ b[2]])
        return bool(torch.equal(y.float().cpu(), want.float().cpu()))
    except (RuntimeError, NotImplementedError):
        return False


def mm_loop(bank, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """mm_grouped as one bank.mm per active expert (the kernel for banks without a grouped one)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(bank.mm(e, rows[start : start + n]))
            start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class DenseBank:
    """w [E, K, N] in the compute dtype, stored out-major (each expert's [N, K] contiguous, the
    checkpoint's own orientation): measured on this CPU, MKL's small-M GEMMs run up to ~1.7x
    faster against that layout than against [K, N] rows (4-16 rows per expert). mm_grouped is
    torch._grouped_mm over the whole bank (one call for every expert, no weight copied) where
    torch has it for the shape, dtype and device; else one matmul per active expert.
    out_major=False keeps w as given (no copy), for callers passing a raw tensor per call."""

    kernel = "dense"

    def __init__(self, w: torch.Tensor, out_major: bool = True):
        # A copy at load only: [E, N, K] contiguous, seen through a transposed view as [E, K, N].
        self.w = w.transpose(1, 2).contiguous().transpose(1, 2) if out_major and w.dim() == 3 else w
        self.num_experts = w.shape[0]
        self.grouped = _grouped_mm_takes(self.w)

    def mm(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.w[e]

    def mm_grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.grouped and rows.is_contiguous() and rows.data_ptr() % _GROUPED_ALIGN == 0 \
                and rows.dtype == self.w.dtype:
            return torch._grouped_mm(rows, self.w, offs=counts.cumsum(0, dtype=torch.int32))
        return mm_loop(self, rows, counts)

    def nbytes(self) -> dict[str, int]:
        return _bytes(self.w)


class Fp8Bank:
    """q [E, N, K] E4M3, scale [E, N] fp32. Kernels: `dequant` (weight-only: E4M3 -> compute dtype per
    call, exact) and, on GPUs with FP8 tensor cores, `scaled_mm` (dynamic per-token FP8 activations,
    as the checkpoint's config declares)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str):
        self.q, self.scale, self.kernel = q, scale.float(), kernel
        self.num_experts = q.shape[0]

    def mm_grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return mm_loop(self, rows, counts)

    def mm(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        if self.kernel == "scaled_mm":
            a_scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
            a = (rows.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            y = torch._scaled_mm(a, self.q[e].t(), scale_a=a_scale, scale_b=self.scale[e][None, :],
                                 out_dtype=torch.bfloat16)
            return y.to(rows.dtype)
        w = fp8_to_float(self.q[e], rows.dtype)
        return ((rows @ w.t()).float() * self.scale[e]).to(rows.dtype)

    def nbytes(self) -> dict[str, int]:
        return _bytes(self.q, self.scale)


class Int8Bank:
    """q [E, N, K] int8, scale [E, N]. Kernels: `packed` (torch._weight_int8pack_mm, bf16 activations)
    and `dequant` (int8 -> compute dtype per call)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str):
        self.q, self.kernel, self.num_experts = q, kernel, q.shape[0]
        # The packed kernel takes scales in the activations' dtype.
        self.scale = scale.to(torch.bfloat16) if kernel == "packed" else scale.float()

    def mm_grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return mm_loop(self, rows, counts)

    def mm(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        if self.kernel == "packed":
            return torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.q[e], self.scale[e]).to(rows.dtype)
        return ((rows @ self.q[e].t().to(rows.dtype)).float() * self.scale[e]).to(rows.dtype)

    def nbytes(self) -> dict[str, int]:
        return _bytes(self.q, self.scale)


class Int4Bank:
    """Group-wise 4-bit. Kernels: `packed` (torch's int4pack layout and matmul, bf16 activations)
    and `dequant` (two values per byte, unpacked into the compute dtype per call)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kernel: str):
        """q [E, N, K] uint8 values 0..15; scale, zero [E, N, K / group]."""
        self.kernel, self.k, self.num_experts = kernel, q.shape[2], q.shape[0]
        self.group = self.k // scale.shape[2]
        if kernel == "packed":
            self.packed = torch.stack([_int4pack(q[e]) for e in range(q.shape[0])])
            # [E, K / group, N, 2]: the packed kernels' scale-and-zero layout.
            self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(1, 2).contiguous().to(torch.bfloat16)
        else:
            self.packed = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()  # [E, N, K / 2]
            self.scale_zero = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)  # [E, N, K / group, 2]

    def mm_grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return mm_loop(self, rows, counts)

    def mm(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        if self.kernel == "packed":
            x = rows.to(torch.bfloat16)
            if rows.device.type == "cpu":
                y = torch._weight_int4pack_mm_for_cpu(x, self.packed[e], self.group, self.scale_zero[e])
            else:
                y = torch._weight_int4pack_mm(x, self.packed[e], self.group, self.scale_zero[e])
            return y.to(rows.dtype)
        p = self.packed[e]
        q = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], self.k)
        sz = self.scale_zero[e]
        w = dequantize_int4(q, sz[..., 0], sz[..., 1]).to(rows.dtype)
        return rows @ w.t()

    def nbytes(self) -> dict[str, int]:
        return {"int4": self.packed.numel() * self.packed.element_size(), **_bytes(self.scale_zero)}


def _int4pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> the packed layout of the device's int4 matmul."""
    if q.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return torch._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), 8)


# ---- building banks and choosing kernels ----

KERNELS = {"fp8": ("scaled_mm", "dequant"), "int8": ("packed", "dequant"), "int4": ("packed", "dequant")}


def build_bank(kind: str, parts: list[tuple], kernel: str):
    """parts: one tuple per expert, as the quantize_* function of `kind` returns it."""
    stacked = [torch.stack(list(col)) for col in zip(*parts, strict=True)]
    if kind == "fp8":
        return Fp8Bank(*stacked, kernel=kernel)
    if kind == "int8":
        return Int8Bank(*stacked, kernel=kernel)
    if kind == "int4":
        return Int4Bank(*stacked, kernel=kernel)
    raise ValueError(f"unknown quantized expert kind {kind!r}")


def quantize(kind: str, w: torch.Tensor, group: int) -> tuple:
    """One expert's fp32 weight [N, K] in the representation of `kind` (group: int4's inputs per scale)."""
    if kind == "fp8":
        return quantize_fp8(w)
    if kind == "int8":
        return quantize_int8(w)
    if kind == "int4":
        return quantize_int4(w, group)
    raise ValueError(f"unknown quantized expert kind {kind!r}")


@functools.cache
def choose_kernel(kind: str, n: int, k: int, device: str, dtype: torch.dtype,
                  group: int) -> tuple[str, dict[str, float]]:
    """The fastest kernel for a bank of [N, K] weights on this device, with each candidate's time
    (seconds for one call at each calibration row count; inf: unavailable or wrong)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.05
    part = quantize(kind, w, group)
    reference = build_bank(kind, [part], "dequant")
    times: dict[str, float] = {}
    for kernel in KERNELS[kind]:
        times[kernel] = float("inf")
        if kernel == "scaled_mm" and not _has_fp8_gemm(device):
            continue
        try:
            bank = build_bank(kind, [tuple(t.to(device) for t in part)], kernel)
            total = 0.0
            for m in _CALIBRATION_ROWS:
                x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
                want = reference.mm(0, x.float().cpu())
                got = bank.mm(0, x).float().cpu()
                if (got - want).abs().max() > _TOLERANCE * want.abs().max():
                    raise ValueError(f"{kind} {kernel} disagrees with the dequantized product")
                total += _median_seconds(lambda b=bank, x=x: b.mm(0, x), device)
            times[kernel] = total
        except (RuntimeError, ValueError, NotImplementedError):  # not built for this device or shape
            continue
    best = min(times, key=times.get)
    if times[best] == float("inf"):
        best = "dequant"  # always correct: the reference itself
    return best, times


def _has_fp8_gemm(device: str) -> bool:
    # Hopper (sm90) and Ada (sm89) have FP8 tensor cores; the CPU path is weight-only.
    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _median_seconds(fn, device: str, runs: int = 5) -> float:
    fn()
    samples = []
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[runs // 2]
