"""Checkpoint reading: sharded index, expert slices, clear errors for bad files."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama4.checkpoint import Checkpoint
from llama4.errors import HerdInputError
from llama4.model import Llama4Model
from llama4.weights import load_experts


def _shard(src, dst):
    """Split a single-file checkpoint into two shards with an index."""
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, dst / fname)
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_sharded_checkpoint_equals_single_file(reference_models, tmp_path):
    _, path = reference_models["tiny-maverick"]
    _shard(path, tmp_path)
    a, b = Llama4Model.load(Checkpoint(path)), Llama4Model.load(Checkpoint(tmp_path))
    assert torch.equal(a.w.layers[2].wq, b.w.layers[2].wq)
    assert torch.equal(a.moe.experts[3][0].w, b.moe.experts[3][0].w)


def test_expert_slice_reads_only_its_own_bytes(reference_models, tmp_path):
    _, path = reference_models["tiny-maverick"]
    ckpt = Checkpoint(path)
    full = load_experts(ckpt, list(range(128)), torch.float32, "cpu")
    # Overwrite every other expert's bytes with NaN on disk: a reader that touches them
    # would return NaN; a slice reader returns the untouched experts exactly.
    keep = [5, 6, 7, 40]
    tensors = load_file(path / "model.safetensors")
    for name, t in tensors.items():
        if ".experts." in name:
            mask = torch.ones(t.shape[0], dtype=torch.bool)
            mask[keep] = False
            t[mask] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    part = load_experts(Checkpoint(tmp_path), keep, torch.float32, "cpu")
    for layer, (w13, w2) in part.items():
        assert w13.w.shape[0] == 4 and not torch.isnan(w13.w).any()
        assert torch.equal(w13.w, full[layer][0].w[keep]) and torch.equal(w2.w, full[layer][1].w[keep])


def test_missing_tensor_is_named(reference_models, tmp_path):
    _, path = reference_models["tiny-scout"]
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(HerdInputError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*missing"):
        Llama4Model.load(Checkpoint(tmp_path))


def test_misshapen_tensor_names_expected_and_actual(reference_models, tmp_path):
    _, path = reference_models["tiny-scout"]
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.feed_forward.experts.down_proj"] = torch.zeros(16, 31, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(HerdInputError) as err:
        Llama4Model.load(Checkpoint(tmp_path))
    msg = str(err.value)
    assert "layers.1.feed_forward.experts.down_proj" in msg and "[16, 31, 64]" in msg and "[16, 32, 64]" in msg


def test_bf16_checkpoint_loads_into_compute_dtype(reference_models, tmp_path):
    _, path = reference_models["tiny-scout"]
    save_file({k: v.bfloat16() for k, v in load_file(path / "model.safetensors").items()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    model = Llama4Model.load(Checkpoint(tmp_path), dtype=torch.float32)
    assert model.w.embed.dtype == torch.float32
