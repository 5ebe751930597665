"""Named model shapes: the published Llama 4 sizes and tiny ones for tests and benchmarks.

A preset has no weights of its own: herd fills it with seeded random weights. Read real
values from a checkpoint's config.json rather than trusting the published table.
"""
from llama4.config import ModelConfig
from llama4.errors import HerdInputError

_SCOUT_ROPE = {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    # Llama-4-Scout-17B-16E-Instruct: every layer MoE, qk-norm, llama3 rope (factor 16, low = high = 1).
    "scout": dict(num_local_experts=16, rope_scaling=_SCOUT_ROPE, use_qk_norm=True, max_position_embeddings=10485760),
    # Llama-4-Maverick-17B-128E-Instruct: MoE on odd layers, dense 16384-wide FFN on even ones, no qk-norm.
    "maverick": dict(num_local_experts=128, moe_layers=tuple(range(1, 48, 2)), use_qk_norm=False,
                     max_position_embeddings=1048576),
    # Behemoth was announced (16 experts, ~2T total, 288B active) without a config: this shape is
    # an estimate that reproduces those totals, for capacity planning only.
    "behemoth": dict(hidden_size=16384, num_hidden_layers=64, num_attention_heads=128, head_dim=128,
                     intermediate_size=36864, num_local_experts=16, rope_scaling=_SCOUT_ROPE, use_qk_norm=True),
    # Tiny shapes: real Llama 4 vocabulary (so the Llama 4 tokenizer works), small everything else.
    "tiny-maverick": dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=128,
                          moe_layers=(1, 3), use_qk_norm=False, attention_chunk_size=32,
                          max_position_embeddings=4096, initializer_range=0.1),
    "tiny-scout": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=16, use_qk_norm=True,
                       rope_scaling={**_SCOUT_ROPE, "original_max_position_embeddings": 64},
                       attention_chunk_size=32, floor_scale=16, max_position_embeddings=4096, initializer_range=0.1),
    # Maverick-shaped and large enough that matmuls are not pure overhead: used by bench/.
    "bench-maverick": dict(vocab_size=32000, hidden_size=1024, intermediate_size=512, intermediate_size_mlp=4096,
                           num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                           num_local_experts=128, moe_layers=(1, 3, 5, 7), use_qk_norm=False,
                           attention_chunk_size=8192, max_position_embeddings=16384,
                           bos_token_id=1, eos_token_id=(2,), pad_token_id=0),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise HerdInputError(f"model: {name!r} is neither a directory nor a preset; presets: {sorted(PRESETS)}")
    return ModelConfig(name=name, **PRESETS[name])
