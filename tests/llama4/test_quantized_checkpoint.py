"""FP8 checkpoints as Meta released Maverick (written here by compressed-tensors), the unfused
per-expert layout, and every malformed quantized checkpoint refused at load with its reason."""
import json
import shutil

import pytest
import torch
from conftest import unfused_experts
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_reference_logits import herd_logits, hf_logits, prompts_for

from llama4.checkpoint import Checkpoint
from llama4.errors import HerdInputError
from llama4.model import Llama4Model
from llama4.weights import expert_bytes, load_experts


def test_fp8_checkpoint_is_the_release_layout(fp8_checkpoint):
    path, _ = fp8_checkpoint
    raw = json.loads((path / "config.json").read_text())
    q = raw["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized" and "text_config" in raw
    assert all(name.startswith("language_model.") for name in q["ignore"])
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    e = "language_model.model.layers.1.feed_forward.experts."
    assert len({index[f"{e}{i}.gate_proj.weight"] for i in range(128)}) == 2  # the shards split a layer's experts
    with safe_open(path / index[f"{e}5.down_proj.weight"], "pt") as f:
        assert f.get_slice(f"{e}5.down_proj.weight").get_dtype() == "F8_E4M3"
        scale = f.get_slice(f"{e}5.down_proj.weight_scale")
        assert scale.get_dtype() == "BF16" and scale.get_shape() == [64, 1]
    with safe_open(path / index["language_model.model.layers.1.self_attn.q_proj.weight"], "pt") as f:
        assert f.get_slice("language_model.model.layers.1.self_attn.q_proj.weight").get_dtype() == "BF16"


def test_fp8_logits_equal_transformers_on_the_dequantized_weights(fp8_checkpoint):
    path, ref = fp8_checkpoint
    model = Llama4Model.load(Checkpoint(path))
    prompts = prompts_for(model.cfg.vocab_size)
    for ours, want in zip(herd_logits(model, prompts), hf_logits(ref, prompts), strict=True):
        assert (ours - want).abs().max().item() <= 1e-3
    # Held as stored: one byte per expert parameter, plus an fp32 scale per output row.
    cfg = model.cfg
    params = len(cfg.moe_layers) * cfg.num_local_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    held = expert_bytes(model.moe.experts)
    assert held["fp8"] == params
    assert held["float32"] == len(cfg.moe_layers) * cfg.num_local_experts * (2 * cfg.intermediate_size
                                                                            + cfg.hidden_size) * 4


def test_a_worker_reads_only_its_own_fp8_experts(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    keep = [3, 4, 90]
    full = load_experts(Checkpoint(path), list(range(128)), torch.float32, "cpu")
    shutil.copy(path / "config.json", tmp_path)
    shutil.copy(path / "model.safetensors.index.json", tmp_path)
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():  # every other expert's bytes become NaN
            parts = name.split(".")
            if "experts" in parts and int(parts[parts.index("experts") + 1]) not in keep:
                t.view(torch.uint8).fill_(0x7F) if t.dtype == torch.float8_e4m3fn else t.fill_(float("nan"))
        save_file(tensors, tmp_path / shard.name)
    part = load_experts(Checkpoint(tmp_path), keep, torch.float32, "cpu")
    for layer, (w13, w2) in part.items():
        assert torch.equal(w13.q.view(torch.uint8), full[layer][0].q[keep].view(torch.uint8))
        assert torch.equal(w2.scale, full[layer][1].scale[keep])


def test_unfused_bf16_experts_equal_the_fused_layout(reference_models, tmp_path):
    hf, path = reference_models["tiny-maverick"]
    bf16 = {k: v.bfloat16() for k, v in load_file(path / "model.safetensors").items()}
    fused_dir, unfused_dir = tmp_path / "fused", tmp_path / "unfused"
    for d, tensors in ((fused_dir, bf16), (unfused_dir, unfused_experts(bf16, Checkpoint(path).config))):
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        shutil.copy(path / "config.json", d)
    a, b = Checkpoint(fused_dir), Checkpoint(unfused_dir)
    assert (a.expert_layout, b.expert_layout) == ("fused", "unfused")
    prompts = prompts_for(a.config.vocab_size, lengths=(80,))
    (la,), (lb,) = herd_logits(Llama4Model.load(a), prompts), herd_logits(Llama4Model.load(b), prompts)
    assert (la - lb).abs().max().item() <= 1e-5


def _rewrite(src, dst, config=None, tensors=None):
    """A copy of checkpoint src with its config.json and/or tensors changed."""
    dst.mkdir(exist_ok=True)
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(raw) if config else raw))
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    everything = {}
    for shard in sorted(set(index.values())):
        everything.update(load_file(src / shard))
    if tensors:
        tensors(everything)
    save_file(everything, dst / "model.safetensors")
    return dst


def _quant(raw, **changes):
    q = raw["quantization_config"]
    for path, value in changes.items():
        node, *keys = path.split("__")
        target = q if node == "top" else q["config_groups"]["group_0"][node]
        target[keys[0]] = value
    return raw


E = "language_model.model.layers.1.feed_forward.experts."


@pytest.mark.parametrize("config, tensors, message", [
    (lambda r: {**r, "quantization_config": {**r["quantization_config"], "quant_method": "gptq"}}, None,
     "quant_method='gptq' is not supported"),
    (lambda r: _quant(r, weights__strategy="tensor"), None, r"weights\.strategy='tensor' is not supported"),
    (lambda r: _quant(r, weights__num_bits=4), None, r"weights\.num_bits=4 is not supported"),
    (lambda r: _quant(r, input_activations__dynamic=False), None,
     r"input_activations\.dynamic=False is not supported"),
    (lambda r: _quant(r, top__format="pack-quantized"), None, "format='pack-quantized' is not supported"),
    (lambda r: _quant(r, top__ignore=[*r["quantization_config"]["ignore"], "language_model.model.layers.1.mlp"]),
     None, "ignore names module 'language_model.model.layers.1.mlp', which is not in the checkpoint"),
    (None, lambda t: t.pop(E + "7.up_proj.weight_scale"),
     f"'{E}7.up_proj.weight' is F8_E4M3 but its scale '{E}7.up_proj.weight_scale' is missing"),
    (None, lambda t: t.update({E + "9.down_proj.weight_scale": torch.ones(64, dtype=torch.bfloat16)}),
     rf"'{E}9.down_proj.weight_scale' has shape \[64\]; expected \[64, 1\]"),
    (None, lambda t: t.update({E + "2.gate_proj.weight": t[E + "2.gate_proj.weight"][:16].contiguous()}),
     rf"'{E}2.gate_proj.weight' has shape \[16, 64\]; expected \[32, 64\]"),
    (None, lambda t: t.update({"language_model.model.layers.2.self_attn.q_proj.weight":
                               t["language_model.model.layers.2.self_attn.q_proj.weight"].to(torch.float8_e4m3fn)}),
     "q_proj.weight' is stored as F8_E4M3; herd reads FP8 weights only for routed experts"),
    (lambda r: {k: v for k, v in r.items() if k != "quantization_config"}, None,
     "stored as F8_E4M3 but config.json has no quantization_config"),
])
def test_malformed_quantized_checkpoint_is_refused_naming_the_problem(fp8_checkpoint, tmp_path, config, tensors,
                                                                      message):
    path, _ = fp8_checkpoint
    bad = _rewrite(path, tmp_path / "bad", config, tensors)
    with pytest.raises(HerdInputError, match=message):
        Llama4Model.load(Checkpoint(bad))


def test_unknown_expert_dtype_is_refused(reference_models):
    _, path = reference_models["tiny-scout"]
    with pytest.raises(HerdInputError, match="expert_dtype='int3' is not supported; allowed: auto, compute, fp8"):
        Llama4Model.load(Checkpoint(path), expert_dtype="int3")


def test_how_experts_are_held_is_part_of_the_serving_fingerprint():
    """Workers and KV entries made with other experts (int4 vs fp32) must not mix: the router refuses
    a worker whose fingerprint differs, and the KV tier keys entries by it."""
    from llama4.quant import serving_fingerprint

    w = "a" * 64
    assert serving_fingerprint(w, "auto", False) == serving_fingerprint(w, "compute", False) == w
    assert serving_fingerprint(w, "auto", True) == serving_fingerprint(w, "fp8", True) == w
    held = {serving_fingerprint(w, d, False) for d in ("compute", "fp8", "int8", "int4", "int4-g32")}
    assert len(held) == 5
    assert serving_fingerprint(w, "compute", True) != w  # an FP8 checkpoint dequantized at load
