"""Kernel math against the formulas of the Llama 4 reference (pure logic, no model)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import attention, grouped_expert_ffn, rope_inv_freq, route_top1, temperature_scale

SCOUT_SCALING = {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192}


def test_scout_llama3_scaling_divides_exactly_the_long_wavelengths():
    base = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, SCOUT_SCALING)
    assert torch.equal(scaled[:35], base[:35])  # lambda_34 ~ 6695 < 8192: unchanged
    assert torch.allclose(scaled[35:], base[35:] / 16)  # lambda_35 ~ 8219 > 8192: divided
    assert not torch.isnan(scaled).any()


def test_llama3_smooth_band_when_low_differs_from_high():
    cfg = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base, scaled = rope_inv_freq(128, 500000.0), rope_inv_freq(128, 500000.0, cfg)
    wavelen = 2 * math.pi / base
    medium = (wavelen >= 2048) & (wavelen <= 8192)
    assert medium.any()
    ratio = scaled[medium] / base[medium]
    assert ((ratio < 1) & (ratio > 1 / 8)).all()


@pytest.mark.parametrize("pos,expected", [(0, 1.0), (8190, 1.0), (8191, 1.0693), (32767, 1.1609),
                                          (131071, 1.2833), (1048575, 1.4860), (10485759, 1.7155)])
def test_temperature_tuning_table(pos, expected):
    assert temperature_scale(torch.tensor([pos]), 8192, 0.1).item() == pytest.approx(expected, abs=1e-4)


def test_route_top1_scales_the_input_by_sigmoid_of_the_chosen_logit():
    gen = torch.Generator().manual_seed(0)
    x, router = torch.randn(10, 8, generator=gen), torch.randn(4, 8, generator=gen)
    ids, scaled = route_top1(x, router)
    logits = x @ router.T
    assert torch.equal(ids, logits.argmax(-1))
    s = torch.sigmoid(logits.max(-1).values)
    assert torch.allclose(scaled, x * s[:, None])


def test_grouped_expert_ffn_equals_dense_per_token_computation():
    gen = torch.Generator().manual_seed(0)
    e, h, i, n = 6, 8, 5, 40
    w13, w2 = torch.randn(e, h, 2 * i, generator=gen), torch.randn(e, i, h, generator=gen)
    x, ids = torch.randn(n, h, generator=gen), torch.randint(0, e, (n,), generator=gen)
    ids[ids == 3] = 4  # an expert with no tokens
    out = grouped_expert_ffn(x, ids, w13, w2)
    for t in range(n):
        gate, up = (x[t] @ w13[ids[t]]).chunk(2)
        assert torch.allclose(out[t], (F.silu(gate) * up) @ w2[ids[t]], atol=1e-5)


def test_chunked_mask_sees_only_the_same_absolute_chunk():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 12, 1, 4), torch.randn(1, 12, 1, 4)
    kpos = torch.arange(12)[None]
    v[0, :8] = 0.0  # keys of the previous chunk carry zero values
    out = attention(q, k, v, torch.tensor([[8]]), kpos, chunk_size=8)  # p=8 starts a new chunk
    assert torch.allclose(out[0, 0], v[0, 8].expand(2, 4))  # sees only itself
    out_full = attention(q, k, v, torch.tensor([[11]]), kpos, chunk_size=None)
    out_chunk = attention(q, k, v, torch.tensor([[11]]), kpos, chunk_size=8)
    assert not torch.allclose(out_full, out_chunk)
