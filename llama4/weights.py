"""Which tensors a Llama 4 text checkpoint holds, their HF names and shapes: one table.

Loading, random initialisation (`herd init-model`) and the services' slices all read it.
Names are relative to the text model (see llama4.checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.quant import DenseBank, ExpertBank, build_bank, choose_kernel, quantize
from llama4.checkpoint import Checkpoint, StoredWeight
from llama4.config import ModelConfig
from llama4.errors import HerdInputError
from llama4.progress import progress
from llama4.quant import int4_group, resolve_expert_dtype

GATE = "feed_forward.router.weight"  # [E, H]: the MoE gate (HF names it the router)
GATE_UP = "feed_forward.experts.gate_up_proj"  # [E, H, 2I], [in, out], gate | up concatenated
DOWN = "feed_forward.experts.down_proj"  # [E, I, H], [in, out]


def layer_prefix(layer: int) -> str:
    return f"layers.{layer}."


def dense_specs(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the attention side holds (all but the gates and the routed experts)."""
    h, d = cfg.hidden_size, cfg.head_dim
    specs = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        p = layer_prefix(layer)
        specs[p + "input_layernorm.weight"] = (h,)
        specs[p + "post_attention_layernorm.weight"] = (h,)
        specs[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * d, h)
        specs[p + "self_attn.k_proj.weight"] = (cfg.num_key_value_heads * d, h)
        specs[p + "self_attn.v_proj.weight"] = (cfg.num_key_value_heads * d, h)
        specs[p + "self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * d)
        if cfg.is_moe_layer(layer):
            i, ff = cfg.intermediate_size, "feed_forward.shared_expert."
        else:
            i, ff = cfg.intermediate_size_mlp, "feed_forward."
        specs[p + ff + "gate_proj.weight"] = (i, h)
        specs[p + ff + "up_proj.weight"] = (i, h)
        specs[p + ff + "down_proj.weight"] = (h, i)
    return specs


def gate_specs(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {layer_prefix(l) + GATE: (cfg.num_local_experts, cfg.hidden_size) for l in cfg.moe_layer_list}


def expert_specs(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    specs = {}
    for l in cfg.moe_layer_list:
        specs[layer_prefix(l) + GATE_UP] = (e, h, 2 * i)
        specs[layer_prefix(l) + DOWN] = (e, i, h)
    return specs


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate, up, down: dense MLP or shared expert


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    layers: list[LayerWeights]

    @classmethod
    def load(cls, ckpt: Checkpoint, dtype: torch.dtype, device: str) -> DenseWeights:
        cfg = ckpt.config
        t = {name: ckpt.tensor(name, shape, dtype, device)
             for name, shape in progress(dense_specs(cfg).items(), desc="dense weights", unit="tensor")}
        layers = []
        for layer in range(cfg.num_hidden_layers):
            p = layer_prefix(layer)
            ff = p + ("feed_forward.shared_expert." if cfg.is_moe_layer(layer) else "feed_forward.")
            layers.append(LayerWeights(
                input_norm=t[p + "input_layernorm.weight"], post_norm=t[p + "post_attention_layernorm.weight"],
                wq=t[p + "self_attn.q_proj.weight"], wk=t[p + "self_attn.k_proj.weight"],
                wv=t[p + "self_attn.v_proj.weight"], wo=t[p + "self_attn.o_proj.weight"],
                ffn=(t[ff + "gate_proj.weight"], t[ff + "up_proj.weight"], t[ff + "down_proj.weight"]),
            ))
        embed = t["embed_tokens.weight"]
        return cls(embed=embed, norm=t["norm.weight"], lm_head=t.get("lm_head.weight", embed), layers=layers)


def load_gates(ckpt: Checkpoint, dtype: torch.dtype, device: str) -> dict[int, torch.Tensor]:
    """{layer: gate weights [E, H]} of every MoE layer."""
    cfg = ckpt.config
    return {l: ckpt.tensor(layer_prefix(l) + GATE, (cfg.num_local_experts, cfg.hidden_size), dtype, device)
            for l in cfg.moe_layer_list}


def load_experts(ckpt: Checkpoint, expert_ids: list[int], dtype: torch.dtype, device: str,
                 expert_dtype: str = "auto") -> dict[int, tuple[ExpertBank, ExpertBank]]:
    """{layer: (w13, w2)} expert banks (kernels.quant) for just the given experts of every MoE layer.

    Experts are read and converted one at a time, so quantizing at load never holds more than
    one expert in fp32 beyond the result.
    """
    resolved = resolve_expert_dtype(expert_dtype, ckpt.stored_fp8)
    kind, group = resolved.split("-g")[0], int4_group(resolved)
    cfg = ckpt.config
    for width in (cfg.hidden_size, cfg.intermediate_size):
        if kind == "int4" and width % group:
            raise HerdInputError(f"expert_dtype={expert_dtype!r} needs expert input widths divisible by {group}; "
                                 f"this model has hidden_size={cfg.hidden_size}, "
                                 f"intermediate_size={cfg.intermediate_size}")
    out = {}
    bar = progress(desc=f"experts ({resolved})", total=len(cfg.moe_layer_list) * len(expert_ids), unit="slice")
    for l in cfg.moe_layer_list:
        w13_parts, w2_parts = [], []
        for e in expert_ids:
            bar.update()
            gate_up, down = ckpt.expert_weights(l, e)
            w13_parts.append(_held(kind, group, gate_up, dtype, device))
            w2_parts.append(_held(kind, group, down, dtype, device))
        out[l] = (_bank(kind, group, w13_parts, gate_up.w.shape, dtype, device),
                  _bank(kind, group, w2_parts, down.w.shape, dtype, device))
    bar.close()
    return out


def _held(kind: str, group: int, stored: StoredWeight, dtype: torch.dtype, device: str):
    """One expert matrix as the bank of `kind` holds it."""
    if kind == "fp8" and stored.scale is not None:
        return stored.w.to(device), stored.scale.to(device)  # the stored bytes, kept as they are
    stored = StoredWeight(stored.w.to(device), None if stored.scale is None else stored.scale.to(device))
    if kind == "compute":
        return stored.dequantized().t().to(dtype)  # herd's [in, out]
    return quantize(kind, stored.dequantized(), group)  # on the device: a GPU quantizes far faster


def _bank(kind: str, group: int, parts: list, shape: torch.Size, dtype: torch.dtype, device: str) -> ExpertBank:
    if kind == "compute":
        return DenseBank(torch.stack(parts))
    n, k = shape
    return build_bank(kind, parts, kernel=choose_kernel(kind, n, k, device, dtype, group)[0])


def expert_bytes(banks: dict[int, tuple[ExpertBank, ExpertBank]]) -> dict[str, int]:
    """Resident bytes of these expert banks by storage dtype (weights and their scales)."""
    total: dict[str, int] = {}
    for pair in banks.values():
        for bank in pair:
            for key, n in bank.nbytes().items():
                total[key] = total.get(key, 0) + n
    return total


def random_tensors(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for every tensor (HF text-only names with the `model.` prefix)."""
    gen = torch.Generator().manual_seed(seed)
    specs = {**dense_specs(cfg), **gate_specs(cfg), **expert_specs(cfg)}
    out = {}
    for name, shape in specs.items():
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensor = torch.randn(shape, generator=gen) * cfg.initializer_range
        out[name if name.startswith("lm_head.") else "model." + name] = tensor
    return out


def load_vision(ckpt: Checkpoint, dtype: torch.dtype, device: str):
    """The vision tower of a multimodal checkpoint (llama4.vision), or None for a text-only one."""
    from llama4.vision import VisionConfig, VisionTower, tensor_specs

    if ckpt.vision_config is None:
        return None
    cfg = VisionConfig.from_hf_dict(ckpt.vision_config)
    specs = tensor_specs(cfg, ckpt.config.hidden_size)
    return VisionTower(cfg, {name: ckpt.raw_tensor(name, shape, dtype, device) for name, shape in specs.items()})
