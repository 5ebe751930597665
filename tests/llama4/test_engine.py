"""Continuous batching, sampling, stops, scoring and request validation in the engine."""
import pytest
import torch

from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.errors import HerdInputError
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(reference_models):
    return Llama4Model.load(Checkpoint(reference_models["tiny-scout"][1]))


def prompts(n, lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (l,), generator=gen).tolist() for l in lengths[:n]]


def test_batched_equals_one_at_a_time_with_late_joiner(model):
    ps = prompts(4, [5, 40, 77, 12])
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    alone = [Engine(model).run([Request(p, params)])[0].output_ids for p in ps]
    engine = Engine(model, max_step_tokens=48)  # forces chunked prefill of the long prompts
    seqs = [engine.add(Request(p, params)) for p in ps[:3]]
    for _ in range(3):
        engine.step()
    seqs.append(engine.add(Request(ps[3], params)))  # joins a running batch
    batch_sizes = []
    while engine.has_work:
        engine.step()
        batch_sizes.append(engine.last_step.num_seqs)
    assert [s.output_ids for s in seqs] == alone
    assert max(batch_sizes) == 4
    assert engine.cache.num_free_tokens() == engine.cache.capacity["chunked"] * engine.cache.block_size


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    (p,) = prompts(1, [10])
    run = lambda params: Engine(model).run([Request(p, params)])[0].output_ids
    a = run(SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    b = run(SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    c = run(SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))
    assert a == b and a != c
    greedy = run(SamplingParams(max_tokens=16, ignore_eos=True))
    assert run(SamplingParams(max_tokens=16, temperature=0.7, top_k=1, seed=1, ignore_eos=True)) == greedy
    assert run(SamplingParams(max_tokens=16, temperature=0.7, top_p=1e-6, seed=1, ignore_eos=True)) == greedy


def test_stop_token_and_logprobs(model):
    (p,) = prompts(1, [10])
    full = Engine(model).run([Request(p, SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    stop = full.output_ids[3]
    first = full.output_ids.index(stop)
    seq = Engine(model).run([Request(p, SamplingParams(max_tokens=8, stop_token_ids=(stop,), ignore_eos=True))])[0]
    assert seq.finish_reason == "stop" and seq.output_ids == full.output_ids[: first + 1]
    assert full.finish_reason == "length"
    assert all(lp <= 0 for lp in full.output_logprobs)


def test_score_logprobs_equal_log_softmax_of_full_forward(model):
    (p,) = prompts(1, [50])
    engine = Engine(model, max_step_tokens=16)
    seq = engine.run([Request(p, SamplingParams(max_tokens=0), prompt_logprobs=True)])[0]
    cache = model.new_cache(1024)
    cache.ensure(0, len(p))
    logits = model.forward(torch.tensor(p), cache.plan([(0, 0, len(p))]), cache, torch.arange(len(p)))
    expect = torch.log_softmax(logits, -1)[torch.arange(len(p) - 1), torch.tensor(p[1:])]
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(p)
    assert torch.allclose(torch.tensor(seq.prompt_logprobs[1:]), expect, atol=1e-5)


@pytest.mark.parametrize("req,needle", [
    (Request([], SamplingParams()), "prompt is empty"),
    (Request([1, 5000], SamplingParams()), "token id 5000"),
    (Request([1, 2], SamplingParams(max_tokens=5000)), "context limit"),
    (Request([1, 2], SamplingParams(temperature=float("nan"))), "temperature"),
    (Request([1, 2], SamplingParams(top_p=0.0)), "top_p"),
])
def test_bad_requests_are_refused_and_engine_keeps_serving(model, req, needle):
    engine = Engine(model, max_model_len=4096)
    with pytest.raises(HerdInputError, match=needle):
        engine.add(req)
    assert engine.run([Request([1, 2, 3], SamplingParams(max_tokens=2))])[0].finish_reason in ("length", "stop")


def test_requests_beyond_the_cache_wait_and_all_finish(model):
    ps = prompts(4, [60, 70, 50, 65], seed=4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    alone = [Engine(model).run([Request(p, params)])[0].output_ids for p in ps]
    engine = Engine(model, max_cache_tokens=256, block_size=16)  # room for two whole sequences
    seqs = [engine.add(Request(p, params)) for p in ps]
    most = 0
    while engine.has_work:
        engine.step()
        most = max(most, len(engine.running))
        assert engine.cache.num_free_blocks() >= 0
    # Blocks are taken as sequences grow: more than two start, the newest give way when the cache
    # runs out and recompute later, and every output still equals its solo run.
    assert [s.output_ids for s in seqs] == alone
    assert most >= 3 and engine.scheduler.num_preemptions > 0
    assert engine.cache.num_free_tokens() == 256
