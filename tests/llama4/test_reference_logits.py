"""herd's layer stack equals transformers' Llama4ForCausalLM on tiny random configs."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams

MODELS = ["tiny-maverick", "tiny-scout"]


def herd_logits(model: Llama4Model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All-position logits for several sequences packed into one forward pass."""
    cache = model.new_cache(8192)
    entries = []
    for i, ids in enumerate(prompts):
        cache.ensure(i, len(ids))
        entries.append((i, 0, len(ids)))
    tokens = torch.tensor([t for ids in prompts for t in ids])
    logits = model.forward(tokens, cache.plan(entries), cache, torch.arange(len(tokens)))
    return list(logits.split([len(p) for p in prompts]))


def hf_logits(hf, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Right-padded batch: positions and chunk boundaries stay absolute for every row."""
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    return [logits[i, : len(p)] for i, p in enumerate(prompts)]


def prompts_for(vocab: int, lengths=(96, 70), seed=1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(reference_models, name):
    hf, path = reference_models[name]
    cfg = Checkpoint(path).config
    # The configs exercise what makes Llama 4 different; check the test really covers it.
    assert cfg.attention_chunk_size < 96
    if name == "tiny-scout":
        assert cfg.use_qk_norm and cfg.rope_scaling["factor"] == 16 and cfg.floor_scale < 96
        assert all(cfg.is_moe_layer(l) for l in range(cfg.num_hidden_layers))
    else:
        assert cfg.num_local_experts == 128 and not cfg.use_qk_norm and not cfg.is_moe_layer(0)
    model = Llama4Model.load(Checkpoint(path))
    prompts = prompts_for(cfg.vocab_size)
    for ours, ref in zip(herd_logits(model, prompts), hf_logits(hf, prompts), strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_decode_against_cache_equals_full_forward(reference_models, name):
    _, path = reference_models[name]
    model = Llama4Model.load(Checkpoint(path))
    (ids,) = prompts_for(model.cfg.vocab_size, lengths=(80,))
    (full,) = herd_logits(model, [ids])
    chunk = model.cfg.attention_chunk_size
    cache = model.new_cache(4096, block_size=8)
    steps = []
    for pos, tok in enumerate(ids):
        cache.ensure("s", pos + 1)
        plan = cache.plan([("s", pos, 1)])
        steps.append(model.forward(torch.tensor([tok]), plan, cache, torch.tensor([0]))[0])
        cache.release_before("s", pos + 1)
    assert len(ids) > 2 * chunk  # crosses chunk boundaries
    assert (torch.stack(steps) - full).abs().max().item() <= 1e-5
    # Chunked layers kept only the current chunk's blocks; full layers kept everything.
    tables = cache.tables["s"]
    assert len(tables["chunked"].ids) <= chunk // 8 + 1
    if "full" in tables:
        assert len(tables["full"].ids) == len(ids) // 8


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_matches_transformers_generate(reference_models, name):
    hf, path = reference_models[name]
    engine = Engine(Llama4Model.load(Checkpoint(path)), max_step_tokens=64)
    prompts = prompts_for(engine.cfg.vocab_size, lengths=(20, 45))
    seqs = engine.run([Request(p, SamplingParams(max_tokens=32)) for p in prompts])
    for prompt, seq in zip(prompts, seqs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
        assert seq.output_ids == ref
        assert len(ref) > 8


def test_multimodal_wrapper_layout_loads(reference_models, tmp_path):
    hf, path = reference_models["tiny-scout"]
    tensors = load_file(path / "model.safetensors")
    wrapped = {("language_model." + k): v for k, v in tensors.items()}
    save_file(wrapped, tmp_path / "model.safetensors")
    text_cfg = json.loads((path / "config.json").read_text())
    text_cfg["model_type"] = "llama4_text"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text_cfg}))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.full_name("lm_head.weight") == "language_model.lm_head.weight"
    model = Llama4Model.load(ckpt)
    prompts = prompts_for(model.cfg.vocab_size, lengths=(64,))
    ours, ref = herd_logits(model, prompts)[0], hf_logits(hf, prompts)[0]
    assert (ours - ref).abs().max().item() <= 1e-4
