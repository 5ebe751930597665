"""ModelConfig: the Llama 4 text model's shape, read from a HF config.json or a preset.

Layer kinds (MoE or dense, RoPE-chunked or NoPE-global) are derived here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from llama4.errors import HerdInputError
from llama4.errors import need as _need

MAX_MICRO_BATCHES = 8  # batching.micro_batches: the most micro-batches one step is cut into

SUPPORTED_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class LayerKind(StrEnum):
    """How a layer attends: the KV cache keeps one block table per kind."""

    CHUNKED = "chunked"  # RoPE layers: attend within absolute attention chunks
    FULL = "full"  # global NoPE layers (and RoPE layers of a model without chunking): the whole history


@dataclass(frozen=True)
class ModelConfig:
    """Field names follow HF's Llama4TextConfig so a config.json maps one to one."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # routed and shared expert width
    intermediate_size_mlp: int = 16384  # dense FFN width (layers that are not MoE)
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: tuple[int, ...] = ()
    no_rope_layers: tuple[int, ...] = ()  # 1 = layer uses RoPE (chunked), 0 = NoPE (global)
    attention_chunk_size: int | None = 8192
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # llama3 parameters, or None for plain RoPE
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 200000
    eos_token_id: tuple[int, ...] = (200001, 200007, 200008)
    pad_token_id: int | None = 200018
    initializer_range: float = 0.02
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", tuple(range(0, n)))
        if not self.no_rope_layers:
            object.__setattr__(self, "no_rope_layers", tuple(int((i + 1) % 4 != 0) for i in range(n)))
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        object.__setattr__(self, "no_rope_layers", tuple(int(i) for i in self.no_rope_layers))
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id",
                           tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()))
        self.validate()

    # ---- derived layer kinds: the one place that decides them ----
    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_set

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_chunked(self, layer: int) -> bool:
        """RoPE layers attend within absolute chunks; NoPE layers see the whole history."""
        return self.uses_rope(layer) and bool(self.attention_chunk_size)

    def layer_kind(self, layer: int) -> LayerKind:
        return LayerKind.CHUNKED if self.is_chunked(layer) else LayerKind.FULL

    @property
    def _moe_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    @property
    def moe_layer_list(self) -> list[int]:
        return sorted(self.moe_layers)

    def validate(self) -> None:
        need = functools.partial(_need, where="model config")
        for fld in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "max_position_embeddings"):
            v = getattr(self, fld)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, fld, v, "a positive integer")
        need(self.intermediate_size_mlp >= 0, "intermediate_size_mlp", self.intermediate_size_mlp, "an integer >= 0")
        need(self.num_experts_per_tok == 1, "num_experts_per_tok", self.num_experts_per_tok,
             "1 (Llama 4 routes top-1 and scales the expert input by the score)")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        need(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even integer (RoPE rotates pairs)")
        need(len(self.no_rope_layers) >= self.num_hidden_layers, "no_rope_layers", list(self.no_rope_layers),
             f"a list of 0/1 with at least num_hidden_layers={self.num_hidden_layers} entries")
        need(all(v in (0, 1) for v in self.no_rope_layers), "no_rope_layers", list(self.no_rope_layers),
             "entries 0 or 1")
        need(all(0 <= i < self.num_hidden_layers for i in self.moe_layers), "moe_layers", list(self.moe_layers),
             f"layer indices in [0, {self.num_hidden_layers})")
        dense = [i for i in range(self.num_hidden_layers) if i not in self._moe_set]
        need(not dense or self.intermediate_size_mlp > 0, "intermediate_size_mlp", self.intermediate_size_mlp,
             "a positive integer when some layers are dense")
        need(self.attention_chunk_size is None or self.attention_chunk_size > 0, "attention_chunk_size",
             self.attention_chunk_size, "a positive integer or null")
        need(self.rope_theta > 0, "rope_theta", self.rope_theta, "a positive number")
        need(self.floor_scale > 0, "floor_scale", self.floor_scale, "a positive number")
        need(self.hidden_act == "silu", "hidden_act", self.hidden_act, "'silu'")
        need(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "a positive number")
        if self.rope_scaling is not None:
            missing = [k for k in _LLAMA3_KEYS if k not in self.rope_scaling]
            need(not missing, "rope_scaling", self.rope_scaling, f"llama3 parameters with keys {list(_LLAMA3_KEYS)}")
            need(float(self.rope_scaling["factor"]) > 0, "rope_scaling.factor", self.rope_scaling["factor"], "> 0")

    # ---- reading and writing HF config.json ----
    @classmethod
    def from_hf_dict(cls, raw: dict, name: str = "") -> ModelConfig:
        # A quantization_config is the checkpoint's business (llama4.quant): the shape is the same.
        model_type = raw.get("model_type")
        if model_type == "llama4":
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise HerdInputError("config.json: model_type='llama4' needs a text_config object")
            raw = text
            model_type = raw.get("model_type", "llama4_text")
        if model_type != "llama4_text":
            raise HerdInputError(f"config.json: model_type={model_type!r} is not supported; "
                                 "allowed: 'llama4_text', 'llama4'")

        kwargs = {}
        names = ({f.name for f in dataclasses.fields(cls)}
                 - {"name", "rope_theta", "rope_scaling", "moe_layers", "no_rope_layers"})
        for key in names:
            if raw.get(key) is not None:
                kwargs[key] = raw[key]
        kwargs["rope_theta"], kwargs["rope_scaling"] = _read_rope(raw)
        layers = int(raw.get("num_hidden_layers", 48))
        if raw.get("moe_layers") is not None:
            kwargs["moe_layers"] = tuple(raw["moe_layers"])
        else:
            step = int(raw.get("interleave_moe_layer_step", 1))
            _need(step >= 1, "interleave_moe_layer_step", step, "an integer >= 1", where="config.json")
            kwargs["moe_layers"] = tuple(range(step - 1, layers, step))
        if raw.get("no_rope_layers"):
            kwargs["no_rope_layers"] = tuple(raw["no_rope_layers"])
        else:
            interval = int(raw.get("no_rope_layer_interval", 4))
            kwargs["no_rope_layers"] = tuple(int((i + 1) % interval != 0) for i in range(layers))
        if "attention_chunk_size" in raw:
            kwargs["attention_chunk_size"] = raw["attention_chunk_size"]
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = int(raw.get("hidden_size", 5120)) // int(raw.get("num_attention_heads", 40))
        kwargs["attn_temperature_tuning"] = bool(raw.get("attn_temperature_tuning", True))
        try:
            return cls(name=name, **kwargs)
        except TypeError as exc:  # a value of the wrong type in config.json
            raise HerdInputError(f"config.json: {exc}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_dict(read_config_json(path), name=str(path))

    def to_hf_dict(self) -> dict:
        """A config.json that transformers' Llama4TextConfig reads back to the same model."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **{k: self.rope_scaling[k] for k in _LLAMA3_KEYS}}
        out = {
            "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text",
            "torch_dtype": "float32",
            "rope_parameters": rope,
            "moe_layers": list(self.moe_layers),
            "no_rope_layers": list(self.no_rope_layers),
            "eos_token_id": list(self.eos_token_id),
        }
        skip = {"name", "rope_theta", "rope_scaling", "moe_layers", "no_rope_layers", "eos_token_id"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
        return out

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- parameter counts (checked against the published sizes) ----
    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts of the text model."""
        h, heads, kv, d = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = h * heads * d * 2 + h * kv * d * 2
        expert = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        total = active = embed + h
        for layer in range(self.num_hidden_layers):
            norms = 2 * h
            if self.is_moe_layer(layer):
                gate = self.num_local_experts * h
                total += attn + norms + gate + expert * (self.num_local_experts + 1)
                active += attn + norms + gate + expert * (1 + self.num_experts_per_tok)
            else:
                dense = 3 * h * self.intermediate_size_mlp
                total += attn + norms + dense
                active += attn + norms + dense
        return total, active


def read_config_json(path: str | Path) -> dict:
    """A checkpoint directory's config.json, whole (the wrapper's quantization and vision configs too)."""
    cfg_path = Path(path) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise HerdInputError(f"model: {cfg_path} does not exist; "
                             "allowed: a directory with a HF config.json, or a preset name") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise HerdInputError(f"model: cannot read {cfg_path}: {exc}") from None
    if not isinstance(raw, dict):
        raise HerdInputError(f"model: {cfg_path} must hold a JSON object")
    return raw


def _read_rope(raw: dict) -> tuple[float, dict | None]:
    """Accept both transformers 5's rope_parameters and the older rope_theta + rope_scaling."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params["rope_theta"] = raw.get("rope_theta", 500000.0)
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise HerdInputError(f"config.json: rope type {rope_type!r} is not supported; "
                             f"allowed: {list(SUPPORTED_ROPE_TYPES)}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 500000.0)))
    if rope_type == "default":
        return theta, None
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise HerdInputError(f"config.json: llama3 rope scaling lacks {missing}")
    return theta, {k: params[k] for k in _LLAMA3_KEYS}

