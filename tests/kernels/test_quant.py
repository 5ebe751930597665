"""Quantized expert banks: every kernel computes the dequantized product, and the kernel choice
never picks one that disagrees with it."""
import pytest
import torch

from kernels import grouped_expert_ffn
from kernels.quant import (
    FP8,
    KERNELS,
    build_bank,
    choose_kernel,
    dequantize_int4,
    fp8_to_float,
    quantize,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

N, K, GROUP = 96, 128, 32


def _weights(seed=0, e=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, K, generator=gen) * 0.05 for _ in range(e)]


def _dequantized(kind, part):
    if kind == "fp8":
        return part[0].float() * part[1][:, None]
    if kind == "int8":
        return part[0].float() * part[1][:, None]
    return dequantize_int4(*part)


@pytest.mark.parametrize("kind, kernel", [(k, kern) for k, kerns in KERNELS.items() for kern in kerns
                                          if kern != "scaled_mm"])
def test_every_cpu_kernel_computes_the_dequantized_product(kind, kernel):
    parts = [quantize(kind, w, GROUP) for w in _weights()]
    bank = build_bank(kind, parts, kernel)
    x = torch.randn(7, K)
    for e, part in enumerate(parts):
        want = x @ _dequantized(kind, part).t()
        got = bank.mm(e, x)
        assert got.dtype == torch.float32 and got.shape == (7, N)
        # Packed kernels take bf16 activations (~3 significant digits); dequantizing kernels are exact in fp32.
        tol = 1e-2 if kernel == "packed" else 1e-5
        assert (got - want).abs().max() <= tol * want.abs().max()


def test_quantization_error_is_bounded_by_half_a_step():
    w = _weights(1, 1)[0]
    q8, s8 = quantize_int8(w)
    assert ((q8.float() * s8[:, None] - w).abs() <= s8[:, None] / 2 + 1e-7).all()
    q4, s4, z4 = quantize_int4(w, GROUP)
    assert q4.max() <= 15 and ((dequantize_int4(q4, s4, z4) - w).abs().reshape(N, -1, GROUP)
                               <= s4[..., None] / 2 + 1e-6).all()
    f8, sf = quantize_fp8(w)
    assert f8.dtype == FP8 and torch.equal(fp8_to_float(f8), f8.float())
    assert ((f8.float() * sf[:, None] - w).abs() <= w.abs() / 16 + sf[:, None] * 2 ** -9).all()


def test_fp8_at_load_matches_compressed_tensors_scales():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = _weights(2, 1)[0]
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    ours, our_scale = quantize_fp8(w)
    assert torch.allclose(our_scale, scale[:, 0], rtol=1e-6)
    assert torch.equal(ours.view(torch.uint8), (w / scale).to(FP8).view(torch.uint8))


def test_all_fp8_bytes_convert_exactly():
    every = torch.arange(256, dtype=torch.uint8).view(FP8)
    got, want = fp8_to_float(every), every.float()
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])


def test_grouped_ffn_on_banks_equals_dense_dequantized_weights():
    gen = torch.Generator().manual_seed(3)
    e, h, i = 4, 64, 32
    w13 = [torch.randn(2 * i, h, generator=gen) * 0.1 for _ in range(e)]  # [out, in]
    w2 = [torch.randn(h, i, generator=gen) * 0.1 for _ in range(e)]
    p13, p2 = [quantize("int8", w, GROUP) for w in w13], [quantize("int8", w, GROUP) for w in w2]
    dense13 = torch.stack([_dequantized("int8", p).t() for p in p13])
    dense2 = torch.stack([_dequantized("int8", p).t() for p in p2])
    x, ids = torch.randn(20, h, generator=gen), torch.randint(0, e, (20,), generator=gen)
    want = grouped_expert_ffn(x, ids, dense13, dense2)
    got = grouped_expert_ffn(x, ids, build_bank("int8", p13, "dequant"), build_bank("int8", p2, "dequant"))
    assert (got - want).abs().max() <= 1e-5


def test_kernel_choice_is_measured_and_refuses_a_wrong_kernel(monkeypatch):
    kernel, times = choose_kernel.__wrapped__("int8", N, K, "cpu", torch.float32, GROUP)
    assert kernel in KERNELS["int8"] and set(times) == set(KERNELS["int8"])
    assert all(0 < t < 1 for t in times.values())
    # A packed kernel that returns wrong numbers (a layout mistake) must lose however fast it is.
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: torch.zeros(x.shape[0], w.shape[0],
                                                                                   dtype=x.dtype))
    kernel, times = choose_kernel.__wrapped__("int8", N, K, "cpu", torch.float32, GROUP)
    assert kernel == "dequant" and times["packed"] == float("inf")
