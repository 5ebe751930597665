"""The embedded default: SmolLM2-135M-Instruct converted to a Llama 4 MoE keeps its function.

The reference is the dense model transformers builds from the same GGUF file.
"""
import math

import pytest
import torch

from llama4.checkpoint import Checkpoint
from llama4.convert import CALIBRATION_TEXT
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import DEFAULT_MODEL, resolve_model, smollm2_gguf
from llama4.tokenizer import Tokenizer

# Held out: not the calibration text the converter uses.
HELD_OUT = """\
Lighthouses were once tended by keepers who lived at the edge of the sea. Every evening the
keeper climbed the spiral stairs, trimmed the wick and polished the great lens so that ships
could find their way past the rocks. In storms the work went on through the night, and many
keepers kept careful logs of the weather, the passing vessels and the repairs they made.
Today most lighthouses are automatic, and their lamps are switched on by sensors that detect
the fading light. Some have become museums where visitors can climb the same stairs and look
out across the water. The old logs are kept in archives, and historians read them to learn how
people lived in such lonely places, what they ate, and how they passed the long winter months.
A small village near the coast holds a festival each summer to remember the keepers. Children
paint pictures of the tower, fishermen decorate their boats with flags, and in the evening the
whole village gathers on the beach to watch the beam sweep across the dark sea once again.
"""
MORE = """\
Gardening teaches patience. Seeds planted in spring need water, sunlight and time before they
show their first green leaves, and a gardener learns to watch the sky, the soil and the insects
that visit each flower. Tomatoes climb their stakes in July, beans twist around strings, and by
the end of August the baskets are full of vegetables to share with neighbours and friends.
Mathematics is the study of patterns. A prime number has no divisors other than one and itself:
two, three, five, seven, eleven and thirteen are the first six. The sum of the angles of a
triangle is one hundred and eighty degrees, and the area of a circle is pi times the square of
its radius. These simple facts are the foundation of engineering, physics and computer science.
When the library opened its new reading room, the town council invited authors, teachers and
students to a morning of talks. A novelist described how she writes a chapter every week, a
historian explained how maps have changed over five centuries, and a group of pupils read poems
they had written about the river, the market square and the hills above the town.
"""


@pytest.fixture(scope="module")
def converted(herd_home):
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def ours(converted):
    return Llama4Model.load(Checkpoint(converted)), Tokenizer.for_checkpoint(converted)


@pytest.fixture(scope="module")
def dense():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def all_logits(model, ids):
    cache = model.new_cache(4096)
    cache.ensure(0, len(ids))
    return model.forward(torch.tensor(ids), cache.plan([(0, 0, len(ids))]), cache, torch.arange(len(ids)))


def perplexity(logits, ids):
    lp = torch.log_softmax(logits[:-1].float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return math.exp(-lp.mean().item())


def test_converted_checkpoint_is_llama4_moe(converted):
    cfg = Checkpoint(converted).config
    assert cfg.num_local_experts >= 8 and len(cfg.moe_layers) >= 10
    assert cfg.attention_chunk_size >= cfg.max_position_embeddings and all(cfg.no_rope_layers)
    assert ((converted / "tokenizer.json").exists()
            and "chat_template" in (converted / "tokenizer_config.json").read_text())


def test_logits_and_perplexity_match_dense_model(ours, dense):
    model, tok = ours
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids256 = tok.encode(HELD_OUT + MORE)[:256]
    assert ids256 == hf_tok(HELD_OUT + MORE).input_ids[:256]  # the converted tokenizer equals the GGUF's
    with torch.no_grad():
        ref = dense(torch.tensor([ids256])).logits[0]
    got = all_logits(model, ids256)
    assert (got - ref).abs().max().item() <= 1e-3
    ids = tok.encode(HELD_OUT)
    with torch.no_grad():
        ref_full = dense(torch.tensor([ids])).logits[0]
    ppl_ours, ppl_ref = perplexity(all_logits(model, ids), ids), perplexity(ref_full, ids)
    assert abs(ppl_ours - ppl_ref) / ppl_ref <= 0.01
    assert ppl_ref < 100  # real English modelling (a uniform guess would be ~49,000)


def test_every_expert_gets_tokens_and_routed_experts_matter(ours):
    model, tok = ours
    ids = tok.encode(HELD_OUT + MORE + HELD_OUT.upper() + MORE.lower())
    assert len(ids) >= 1000
    for counts in model.moe.tokens_per_expert.values():
        counts.zero_()
    base = perplexity(all_logits(model, ids), ids)
    for layer, counts in model.moe.tokens_per_expert.items():
        assert (counts > 0).all(), f"layer {layer}: an expert received no tokens: {counts.tolist()}"
    saved = {l: (w13.w.clone(), w2.w.clone()) for l, (w13, w2) in model.moe.experts.items()}
    try:
        for w13, w2 in model.moe.experts.values():
            w13.w.zero_()
            w2.w.zero_()
        zeroed = perplexity(all_logits(model, ids), ids)
    finally:
        for l, (w13, w2) in saved.items():
            model.moe.experts[l][0].w.copy_(w13)
            model.moe.experts[l][1].w.copy_(w2)
    assert zeroed > 1.10 * base


def test_chat_answer_names_paris(ours):
    model, tok = ours
    ids = tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}])
    (seq,) = Engine(model).run([Request(ids, SamplingParams(max_tokens=24))])
    assert "Paris" in tok.detokenize(seq.output_ids)
    assert CALIBRATION_TEXT not in HELD_OUT


@pytest.mark.parametrize("kind, max_ppl_ratio, min_memory_ratio", [("int8", 1.01, 3.9), ("int4-g32", 1.05, 6.3)])
def test_quantized_experts_keep_perplexity_the_answer_and_shrink_memory(ours, converted, kind, max_ppl_ratio,
                                                                        min_memory_ratio):
    """Weight-only int8 (per channel) and int4 (per group) experts, quantized at load from fp32."""
    from llama4.weights import expert_bytes

    model, tok = ours
    quantized = Llama4Model.load(Checkpoint(converted), expert_dtype=kind)
    ids = tok.encode(HELD_OUT + MORE)
    base = perplexity(all_logits(model, ids), ids)
    ratio = perplexity(all_logits(quantized, ids), ids) / base
    assert ratio <= max_ppl_ratio, f"{kind}: perplexity {ratio:.4f}x fp32's"
    fp32 = sum(expert_bytes(model.moe.experts).values())
    held = expert_bytes(quantized.moe.experts)
    # The weights, and their scales: bf16 for the packed kernels, fp32 when dequantizing was measured faster.
    stored = kind.split("-g")[0]  # int4-g32 is held as int4
    assert stored in held and set(held) <= {stored, "bfloat16", "float32"}
    assert fp32 / sum(held.values()) >= min_memory_ratio
    prompt = tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}])
    (want,) = Engine(model).run([Request(prompt, SamplingParams(max_tokens=24))])
    (got,) = Engine(quantized).run([Request(prompt, SamplingParams(max_tokens=24))])
    assert "Paris" in tok.detokenize(got.output_ids)
    assert got.output_ids == want.output_ids
