"""ModelConfig: both HF config forms, both rope spellings, presets, and clear errors."""
import json

import pytest

from llama4.config import ModelConfig
from llama4.errors import HerdInputError
from llama4.presets import PRESETS, preset

MAVERICK_JSON = {  # the shape of the published Maverick config.json (multimodal wrapper)
    "model_type": "llama4",
    "text_config": {
        "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_local_experts": 128, "interleave_moe_layer_step": 2, "use_qk_norm": False,
        "rope_theta": 500000.0, "rope_scaling": None, "attention_chunk_size": 8192, "vocab_size": 202048,
        "no_rope_layers": [], "attn_temperature_tuning": 4, "floor_scale": 8192, "attn_scale": 0.1,
    },
}


def test_wrapper_form_and_derived_layer_kinds():
    cfg = ModelConfig.from_hf_dict(MAVERICK_JSON)
    assert cfg.moe_layer_list == list(range(1, 48, 2))
    assert [l for l in range(48) if not cfg.uses_rope(l)] == list(range(3, 48, 4))
    assert cfg.attn_temperature_tuning is True and cfg.rope_scaling is None


def test_rope_scaling_and_rope_parameters_spellings_agree():
    old = {"model_type": "llama4_text", "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192}}
    new = {"model_type": "llama4_text", "rope_parameters": {"rope_theta": 500000.0, **old["rope_scaling"]}}
    a, b = ModelConfig.from_hf_dict(old), ModelConfig.from_hf_dict(new)
    assert a.rope_scaling == b.rope_scaling and a.rope_scaling["factor"] == 16.0 and a.rope_theta == b.rope_theta


def test_round_trip_through_hf_dict():
    cfg = preset("tiny-scout")
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize("name,total,active", [("scout", 109e9, 17e9), ("maverick", 400e9, 17e9),
                                               ("behemoth", 2e12, 288e9)])
def test_presets_have_published_sizes(name, total, active):
    t, a = preset(name).param_counts()
    assert abs(t - total) / total < 0.05
    assert abs(a - active) / active < 0.05


def test_bench_maverick_is_maverick_shaped():
    cfg = preset("bench-maverick")
    assert cfg.num_local_experts == 128 and cfg.hidden_size >= 1024 and cfg.num_hidden_layers >= 8
    assert cfg.moe_layer_list == list(range(1, cfg.num_hidden_layers, 2))
    assert set(PRESETS) >= {"scout", "maverick", "behemoth", "tiny-maverick", "tiny-scout", "bench-maverick"}


@pytest.mark.parametrize("raw,needle", [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"model_type": "llama4_text", "num_experts_per_tok": 2}, "num_experts_per_tok=2"),
    ({"model_type": "llama4_text", "num_key_value_heads": 7}, "num_key_value_heads=7"),
    ({"model_type": "llama4_text", "rope_scaling": {"rope_type": "yarn", "factor": 4}}, "'yarn'"),
    ({"model_type": "llama4_text", "hidden_size": -5}, "hidden_size=-5"),
])
def test_bad_values_name_field_and_value(raw, needle):
    with pytest.raises(HerdInputError, match=".*") as err:
        ModelConfig.from_hf_dict(raw)
    assert needle in str(err.value)
    assert "allowed" in str(err.value) or "not supported" in str(err.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(HerdInputError) as err:
        preset("llama5")
    assert "'llama5'" in str(err.value) and "tiny-scout" in str(err.value)
