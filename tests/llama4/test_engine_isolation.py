"""One request never hurts another, inside the engine: sampling edge values, equal labels,
per-sequence failures, fair admission with preemption, a bounded queue, chunked scoring."""
import math

import pytest
import torch

from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, QueueFull, Request
from llama4.errors import HerdInputError
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def model(reference_models):
    return Llama4Model.load(Checkpoint(reference_models["tiny-scout"][1]))


def prompts(lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in lengths]


def solo(model, prompt, **kw):
    return Engine(model).run([Request(prompt, SamplingParams(ignore_eos=True, **kw))])[0]


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 5e-324, 1e-6])
def test_tiny_temperatures_are_greedy_beside_a_greedy_neighbour(model, temperature):
    a, b = prompts([12, 20])
    engine = Engine(model)
    tiny = engine.add(Request(a, SamplingParams(max_tokens=10, temperature=temperature, ignore_eos=True)))
    greedy = engine.add(Request(b, SamplingParams(max_tokens=10, ignore_eos=True)))
    while engine.has_work:
        engine.step()
    assert tiny.finish_reason == greedy.finish_reason == "length"
    assert tiny.output_ids == solo(model, a, max_tokens=10).output_ids
    assert greedy.output_ids == solo(model, b, max_tokens=10).output_ids


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("temperature", -1.0), ("top_p", float("nan")), ("top_p", 1.5),
                                         ("top_k", 10**9), ("max_tokens", 10**6)])
def test_bad_sampling_values_are_refused_naming_the_field(model, field, value):
    engine = Engine(model, max_new_tokens=512)
    with pytest.raises(HerdInputError, match=field):
        engine.add(Request([1, 2, 3], SamplingParams(**{field: value})))


def test_sampling_is_safe_for_every_accepted_temperature():
    logits = torch.tensor([1e4, -1e4, 0.0, 3e38])
    for t in (1e-5, 1e-3, 1.0, 1e6, 3e38):
        token = sample(logits, SamplingParams(temperature=t, top_p=0.9, top_k=3), torch.Generator().manual_seed(0))
        assert 0 <= token < 4


def test_equal_labels_are_independent_requests(model):
    a, b = prompts([15, 33], seed=8)
    engine = Engine(model)
    first = engine.add(Request(a, SamplingParams(max_tokens=12, ignore_eos=True), request_id="same"))
    second = engine.add(Request(b, SamplingParams(max_tokens=12, ignore_eos=True), request_id="same"))
    assert first.id != second.id
    while engine.has_work:
        engine.step()
    assert first.output_ids == solo(model, a, max_tokens=12).output_ids
    assert second.output_ids == solo(model, b, max_tokens=12).output_ids
    engine.abort(first.id)  # aborting one label-twin never touches the other
    assert second.finish_reason == "length"


def test_a_sequence_whose_sampling_fails_fails_alone(model):
    a, b = prompts([10, 14], seed=9)
    engine = Engine(model)
    broken = engine.add(Request(a, SamplingParams(max_tokens=8, temperature=0.8, seed=1, ignore_eos=True)))
    fine = engine.add(Request(b, SamplingParams(max_tokens=8, ignore_eos=True)))
    broken.generator = "not a generator"  # any failure inside one sequence's sampling
    while engine.has_work:
        engine.step()
    assert broken.finish_reason == "error" and "sampling failed" in broken.error
    assert fine.output_ids == solo(model, b, max_tokens=8).output_ids
    assert engine.cache.num_free_blocks() == engine.cache.num_blocks


def test_a_short_request_starts_while_a_long_one_runs(model):
    long_prompt, short_prompt = prompts([40, 16], seed=10)
    engine = Engine(model, max_cache_tokens=512, max_new_tokens=400)
    long_seq = engine.add(Request(long_prompt, SamplingParams(max_tokens=400, ignore_eos=True)))
    for _ in range(3):
        engine.step()
    short = engine.add(Request(short_prompt, SamplingParams(max_tokens=16, ignore_eos=True)))
    while not short.finished:
        engine.step()
    assert not long_seq.finished and short.finish_reason == "length"
    assert short.output_ids == solo(model, short_prompt, max_tokens=16).output_ids


def test_preempted_sequences_recompute_to_the_same_tokens(model):
    ps = prompts([30, 45, 38, 50, 41, 36], seed=11)
    params = SamplingParams(max_tokens=48, temperature=0.9, seed=5, ignore_eos=True)
    alone = [Engine(model).run([Request(p, params)])[0].output_ids for p in ps]
    engine = Engine(model, max_cache_tokens=256, block_size=16)
    seqs = engine.run([Request(p, params) for p in ps])
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == alone  # seeded sampling survives a preemption too


def test_the_waiting_queue_is_bounded(model):
    engine = Engine(model, max_waiting=2)
    accepted = [engine.add(Request(p, SamplingParams(max_tokens=4))) for p in prompts([5, 6])]
    with pytest.raises(QueueFull, match="queue is full"):
        engine.add(Request([1, 2, 3], SamplingParams(max_tokens=4)))
    while engine.has_work:
        engine.step()
    assert all(s.finish_reason in ("length", "stop") for s in accepted)


def test_prompt_limit_comes_from_the_config(model):
    engine = Engine(model, max_prompt_tokens=8)
    with pytest.raises(HerdInputError, match="at most 8"):
        engine.add(Request(list(range(3, 12)), SamplingParams(max_tokens=1)))


def test_chunked_score_equals_one_shot_log_softmax(model):
    (p,) = prompts([300], seed=12)
    cache = model.new_cache(1024)
    cache.ensure(0, len(p))
    h, _ = model.hidden_states(torch.tensor(p), cache.plan([(0, 0, len(p))]), cache)
    rows, targets = torch.arange(len(p) - 1), torch.tensor(p[1:])
    full = torch.log_softmax(model.logits(h, rows), -1)[rows, targets]
    for chunk in (1, 7, 256, 1000):
        assert torch.allclose(model.token_logprobs(h, rows, targets, chunk=chunk), full, atol=1e-5)
    seq = Engine(model, max_step_tokens=64).run([Request(p, SamplingParams(max_tokens=0), prompt_logprobs=True)])[0]
    assert len(seq.prompt_logprobs) == len(p) and all(math.isfinite(x) for x in seq.prompt_logprobs[1:])
    assert torch.allclose(torch.tensor(seq.prompt_logprobs[1:]), full, atol=1e-5)
