"""`herd convert`: a dense Llama-architecture GGUF model -> a Llama 4-format MoE checkpoint.

A SwiGLU MLP is a sum over its intermediate neurons, so on every MoE layer the neurons are
split in two halves of equal width (Llama 4's shared and routed experts have one width):
the less important half becomes the shared expert and the more important half is copied
into every routed expert. Whatever expert a token is routed to, shared + routed recomputes
the dense MLP. Llama 4 scales the routed expert's *input* by sigmoid(gate logit); gate
rows are kept tiny (|logit| <= 1e-7 on calibration text, so every score is 0.5 to ~1e-7) and the factor 2 is
folded into the experts' gate and up weights. Gate rows are random directions in the
whitened space of that layer's inputs, orthogonal to their mean, so top-1 spreads tokens
over all experts. q/k weights in GGUF are already in the interleaved RoPE layout Llama 4 uses.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from llama4.checkpoint import Checkpoint, save_checkpoint
from llama4.config import ModelConfig
from llama4.errors import HerdInputError
from llama4.model import Llama4Model
from llama4.moe import LocalMoE
from llama4.progress import progress
from llama4.tokenizer import Tokenizer
from llama4.weights import GATE

CALIBRATION_TEXT = """\
The river wound through the valley like a silver ribbon, catching the last light of the
afternoon. Farmers walked home along the road, talking about the harvest, the weather and
the price of grain at the market in town. In the distance, a train whistled as it crossed
the old stone bridge that had stood for more than two hundred years.
Scientists measure the speed of light with great precision: about 299,792 kilometres per
second in a vacuum. Water boils at 100 degrees Celsius at sea level, and the Earth orbits
the Sun once every 365.25 days. The human heart beats roughly 100,000 times a day.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
Dear team, thank you for your hard work this quarter. Our customers noticed the faster
delivery times, and the new support process has cut waiting times in half. Please join us
on Friday at four o'clock for a small celebration in the main meeting room.
Question: What is the largest planet in our solar system? Answer: Jupiter, a gas giant
with a mass more than twice that of all the other planets combined. Question: Who wrote
the play Romeo and Juliet? Answer: William Shakespeare, in the late sixteenth century.
To bake bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let it
rise for an hour, shape it, and bake it in a hot oven until the crust is golden brown.
The committee reviewed the proposal carefully and decided to postpone the vote until the
budget figures are confirmed by the finance department next month.
"""


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _dequantized(reader) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
    return out


def _tokenizer_files(reader) -> dict[str, str]:
    """tokenizer.json (byte-level BPE) and tokenizer_config.json with the GGUF's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise HerdInputError(f"convert: tokenizer.ggml.model={_field(reader, 'tokenizer.ggml.model')!r}; "
                             "allowed: 'gpt2'")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=False) if ty == 3])
    bos, eos = (tokens[_field(reader, "tokenizer.ggml.bos_token_id")],
                tokens[_field(reader, "tokenizer.ggml.eos_token_id")])
    config = {"bos_token": bos, "eos_token": eos,
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
              "chat_template": _field(reader, "tokenizer.chat_template")}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def _neuron_order(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Neurons from least to most important (weight-norm product as the importance proxy)."""
    return torch.argsort(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))


class _RecordingMoE(LocalMoE):
    """Captures every MoE layer's inputs during calibration."""

    def __init__(self, *args):
        super().__init__(*args)
        self.inputs: dict[int, list[torch.Tensor]] = {l: [] for l in self.gates}

    def submit(self, layer, x):
        self.inputs[layer].append(x.clone())
        return super().submit(layer, x)


def _gates(calib: dict[int, torch.Tensor], num_experts: int, seed: int, logit_scale: float) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, x in calib.items():
        x = x.double()
        mu = x.mean(0)
        cov = torch.cov((x - mu).T)
        cov += torch.eye(cov.shape[0], dtype=cov.dtype) * (1e-3 * cov.diagonal().mean())
        evals, evecs = torch.linalg.eigh(cov)
        inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
        u = inv_sqrt @ mu
        u /= u.norm()
        g = torch.randn(num_experts, x.shape[1], generator=gen, dtype=torch.float64)
        g -= (g @ u)[:, None] * u[None, :]  # orthogonal to the whitened mean: no expert favoured
        rows = g @ inv_sqrt
        rows *= logit_scale / (x @ rows.T).abs().max()
        out[layer] = rows.float()
    return out


CONVERTER_VERSION = 2  # bump when the construction changes: cached conversions rebuild


def convert_gguf(gguf_path: str | Path, out: str | Path, num_experts: int = 8, moe_step: int = 2, seed: int = 0,
                 logit_scale: float = 1e-7) -> Path:
    from gguf import GGUFReader

    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise HerdInputError(f"convert: {gguf_path} is not a file")
    reader = GGUFReader(str(gguf_path))
    if _field(reader, "general.architecture") != "llama":
        raise HerdInputError(f"convert: general.architecture={_field(reader, 'general.architecture')!r}; "
                             "allowed: 'llama'")
    a = "llama."
    layers = int(_field(reader, a + "block_count"))
    hidden, ffn = int(_field(reader, a + "embedding_length")), int(_field(reader, a + "feed_forward_length"))
    heads, kv_heads = (int(_field(reader, a + "attention.head_count")),
                       int(_field(reader, a + "attention.head_count_kv")))
    context = int(_field(reader, a + "context_length"))
    if ffn % 2:
        raise HerdInputError(f"convert: feed_forward_length={ffn} must be even to split into shared and routed halves")
    w = _dequantized(reader)
    tied = "output.weight" not in w
    vocab = w["token_embd.weight"].shape[0]
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn // 2, intermediate_size_mlp=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        num_local_experts=num_experts, moe_layers=tuple(range(moe_step - 1, layers, moe_step)),
        no_rope_layers=(1,) * layers, attention_chunk_size=context,
        rope_theta=float(_field(reader, a + "rope.freq_base")),
        rope_scaling=None, use_qk_norm=False, attn_temperature_tuning=False, max_position_embeddings=context,
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon")), tie_word_embeddings=tied,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=(int(_field(reader, "tokenizer.ggml.eos_token_id")),),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)), name=f"{gguf_path.stem}-moe")

    t = {"model.embed_tokens.weight": w["token_embd.weight"], "model.norm.weight": w["output_norm.weight"]}
    if not tied:
        t["lm_head.weight"] = w["output.weight"]
    half = ffn // 2
    for l in progress(range(layers), desc="convert: layers", unit="layer"):
        g, p = f"blk.{l}.", f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = w[g + "attn_norm.weight"]
        t[p + "post_attention_layernorm.weight"] = w[g + "ffn_norm.weight"]
        for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
            t[p + f"self_attn.{ours}_proj.weight"] = w[g + f"attn_{theirs}.weight"]
        gate, up, down = w[g + "ffn_gate.weight"], w[g + "ffn_up.weight"], w[g + "ffn_down.weight"]
        if not cfg.is_moe_layer(l):
            t[p + "feed_forward.gate_proj.weight"], t[p + "feed_forward.up_proj.weight"] = gate, up
            t[p + "feed_forward.down_proj.weight"] = down
            continue
        order = _neuron_order(gate, up, down)
        shared, routed = order[:half], order[half:]
        s = "feed_forward.shared_expert."
        t[p + s + "gate_proj.weight"], t[p + s + "up_proj.weight"] = gate[shared], up[shared]
        t[p + s + "down_proj.weight"] = down[:, shared]
        # Routed expert input is 0.5 * x (sigmoid of a ~0 logit): fold the 2 into gate and up.
        gate_up = torch.cat([2.0 * gate[routed].T, 2.0 * up[routed].T], dim=1)  # [H, 2I], [in, out]
        t[p + "feed_forward.experts.gate_up_proj"] = gate_up[None]  # one expert until calibrated
        t[p + "feed_forward.experts.down_proj"] = down[:, routed].T[None]
        t[p + GATE] = torch.zeros(1, hidden)

    files = _tokenizer_files(reader)
    # Calibration needs the experts' inputs only, and every expert is the same: a one-expert
    # model computes them exactly as the full one would (a zero gate routes every row to it).
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, dataclasses.replace(cfg, num_local_experts=1), t, files)
        model = Llama4Model.load(Checkpoint(tmp))
        ids = Tokenizer.for_checkpoint(tmp).encode(CALIBRATION_TEXT)
        recorder = _RecordingMoE(model.moe.gates, model.moe.experts)
        model.moe = recorder
        cache = model.new_cache(4096)
        cache.ensure(0, len(ids))
        model.forward(torch.tensor(ids), cache.plan([(0, 0, len(ids))]), cache, torch.tensor([len(ids) - 1]))
        calib = {l: torch.cat(xs) for l, xs in recorder.inputs.items()}
    for l, gate_rows in _gates(calib, num_experts, seed, logit_scale).items():
        p = f"model.layers.{l}.feed_forward.experts."
        for name in ("gate_up_proj", "down_proj"):
            t[p + name] = t[p + name].expand(num_experts, -1, -1).contiguous()
        t[f"model.layers.{l}.{GATE}"] = gate_rows

    tmp_out = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}-"))
    save_checkpoint(tmp_out, cfg, t, files)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out.rename(out)
    return out
