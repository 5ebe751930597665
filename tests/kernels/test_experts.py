"""The grouped expert FFN (one grouped matmul per projection) equals the loop per expert it
replaced and the dense per-token formula, for dense and quantized banks (pure logic)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import grouped_expert_ffn
from kernels.quant import KERNELS, DenseBank, build_bank, dequantize_int4, quantize

E, H, I, GROUP = 6, 64, 32, 32


def loop_ffn(x, ids, w13, w2):
    """The kernel before grouping: sort, then one matmul pair per active expert."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=w13.num_experts).tolist()
    xs, out = x[order], torch.empty_like(x)
    start, ys = 0, torch.empty_like(x)
    for e, n in enumerate(counts):
        if n:
            gate, up = w13.mm(e, xs[start : start + n]).chunk(2, dim=-1)
            ys[start : start + n] = w2.mm(e, F.silu(gate) * up)
            start += n
    out[order] = ys
    return out


def dense_reference(x, ids, w13, w2):
    """Per token: (silu(x W_gate) * x W_up) W_down of its expert, weights [E, in, out] in fp64."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        gate, up = (x[t].double() @ w13[ids[t]].double()).chunk(2)
        out[t] = (F.silu(gate) * up) @ w2[ids[t]].double()
    return out.float()


def ids_with(rows_per_expert: list[int], seed: int = 0) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(rows_per_expert)]).long()
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]


CASES = {
    "1 each": [1] * E,
    "4 each": [4] * E,
    "16 each": [16] * E,
    "64 each": [64] * E,
    "uneven, idle experts": [0, 7, 0, 1, 64, 3],
    "one expert": [0, 0, 0, 5, 0, 0],
    "one row": [0, 0, 1, 0, 0, 0],
}


def weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, H, 2 * I, generator=gen) * 0.1, torch.randn(E, I, H, generator=gen) * 0.1


@pytest.mark.parametrize("case", CASES)
def test_dense_grouped_equals_the_loop_and_the_formula(case):
    w13, w2 = weights()
    ids = ids_with(CASES[case])
    x = torch.randn(len(ids), H, generator=torch.Generator().manual_seed(1))
    b13, b2 = DenseBank(w13), DenseBank(w2)
    assert b13.grouped and b2.grouped  # this shape runs torch._grouped_mm on the CPU, not the loop
    assert torch.equal(b13.w, w13) and b13.w.stride() == (H * 2 * I, 1, H)  # the same values, stored out-major
    got = grouped_expert_ffn(x, ids, b13, b2)
    assert got.shape == x.shape
    assert torch.allclose(got, loop_ffn(x, ids, b13, b2), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got, dense_reference(x, ids, w13, w2), rtol=1e-4, atol=1e-5)
    # Raw tensors run as given ([in, out] rows, no copy): the same values, summed in another order.
    assert torch.allclose(grouped_expert_ffn(x, ids, w13, w2), got, rtol=1e-5, atol=1e-6)


def test_no_rows_and_unaligned_shapes_fall_back_to_the_loop():
    w13, w2 = weights()
    assert grouped_expert_ffn(torch.empty(0, H), torch.empty(0, dtype=torch.long), w13, w2).shape == (0, H)
    gen = torch.Generator().manual_seed(2)
    odd13, odd2 = torch.randn(E, 5, 6, generator=gen), torch.randn(E, 3, 5, generator=gen)  # 20- and 24-byte rows
    assert not DenseBank(odd13).grouped
    ids = ids_with([0, 2, 0, 3, 1, 0])
    x = torch.randn(len(ids), 5, generator=gen)
    assert torch.allclose(grouped_expert_ffn(x, ids, odd13, odd2), dense_reference(x, ids, odd13, odd2), atol=1e-5)


def _dequantized(kind, part):
    if kind == "int4":
        return dequantize_int4(*part)
    return part[0].float() * part[1][:, None]


@pytest.mark.parametrize("kind, kernel", [(k, kern) for k, kerns in KERNELS.items() for kern in kerns
                                          if kern != "scaled_mm"])
@pytest.mark.parametrize("case", ["4 each", "uneven, idle experts", "one row"])
def test_quantized_banks_equal_the_loop_and_their_dequantized_weights(kind, kernel, case):
    w13, w2 = weights(3)
    # Quantized banks hold [out, in], as the checkpoint does.
    parts13 = [quantize(kind, w13[e].t().contiguous(), GROUP) for e in range(E)]
    parts2 = [quantize(kind, w2[e].t().contiguous(), GROUP) for e in range(E)]
    b13, b2 = build_bank(kind, parts13, kernel), build_bank(kind, parts2, kernel)
    ids = ids_with(CASES[case])
    x = torch.randn(len(ids), H, generator=torch.Generator().manual_seed(4))
    got = grouped_expert_ffn(x, ids, b13, b2)
    assert torch.allclose(got, loop_ffn(x, ids, b13, b2), rtol=1e-5, atol=1e-6)
    d13 = torch.stack([_dequantized(kind, p).t() for p in parts13])
    d2 = torch.stack([_dequantized(kind, p).t() for p in parts2])
    want = dense_reference(x, ids, d13, d2)
    tol = 2e-2 if kernel == "packed" else 1e-4  # packed kernels take bf16 activations
    assert (got - want).abs().max() <= tol * want.abs().max()
