"""One request never hurts another, inside the engine: sampling edge values, equal labels,
per-sequence failures, fair admission with preemption, a bounded queue, chunked scoring, and
a step whose rows the experts refuse (only the sequence they came from fails)."""
import math

import pytest
import torch

from llama4.checkpoint import Checkpoint
from llama4.engine import ISOLATION_RUNS_PER_HALVING, Engine, QueueFull, Request, RowsRefused, TierStats
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


class DictTier:
    """An in-memory KV tier (llama4.engine.KVTier): what the engine saved, to compare."""

    block_size, hash_seed = 16, b"isolation"

    def __init__(self):
        self.entries, self.stats = {}, TierStats()

    def available(self):
        return True

    def count_present(self, hashes, kind):
        present = {k.block_hash for k in self.entries if k.kind == kind}
        return next((i for i, h in enumerate(hashes) if h not in present), len(hashes))

    def get(self, keys):
        return [self.entries.get(k) for k in keys]

    def put(self, entries):
        self.entries.update((k, t.clone()) for k, t in entries)
        return True


class RefusingMoE:
    """The in-process experts, refusing (as an expert worker refuses an overflowing output) every
    exchange that holds a row routed to `expert` of MoE layer `layer`, or every exchange at all
    (refuse_all); `fault` is raised instead by every exchange (a failure of the cluster's).
    Records the (layer, expert) of every row it saw."""

    is_remote = False

    def __init__(self, local, layer=-1, expert=-1):
        self.local, self.layer, self.expert = local, layer, expert
        self.refuse_all, self.fault, self.used = False, None, set()

    def submit(self, layer, x):
        return _Checked(self, layer, self.local.submit(layer, x))

    def _check(self, layer, routed):
        self.used |= {(layer, e) for e in routed.route.expert_ids.tolist()}
        if self.fault is not None:
            raise self.fault
        if self.refuse_all or (layer == self.layer and (routed.route.expert_ids == self.expert).any()):
            raise RowsRefused(f"expert output overflowed in layer {layer}")
        return routed


class _Checked:
    def __init__(self, moe, layer, pending):
        self.moe, self.layer, self.pending = moe, layer, pending

    def result(self):
        return self.moe._check(self.layer, self.pending.result())


def with_moe(model, moe):
    return Llama4Model(model.cfg, model.w, moe, model.dtype, model.device, model.vision, model.image_token_id)


def experts_used(model, request):
    moe = RefusingMoE(model.moe)
    Engine(with_moe(model, moe)).run([request])
    return moe.used


def count_runs(engine):
    """Record the batch size of every forward pass, negative when it failed."""
    runs, run = [], engine._run

    def counted(work):
        try:
            out = run(work)
        except Exception:
            runs.append(-len(work.batch))
            raise
        runs.append(len(work.batch))
        return out

    engine._run = counted
    return runs


def greedy(prompt, n):
    return Request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))


def test_a_refused_row_fails_only_its_sequence_and_leaves_nothing_behind(model):
    """Beside decodes (one greedy, one seeded) and a scored prompt, a sequence whose prefill the
    experts refuse in the last MoE layer fails alone, with the refusal; the others get exactly their
    undisturbed tokens, log-probabilities and KV tier entries, over two micro-batches, chunked
    attention windows and blocks crossing steps."""
    a, b, scored = prompts([40, 36, 30], seed=21)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, seed=4, ignore_eos=True)
    score = Request(scored, SamplingParams(max_tokens=0), prompt_logprobs=True)
    last = model.cfg.moe_layer_list[-1]
    innocent = experts_used(model, greedy(a, 10)) | experts_used(model, Request(b, seeded)) | \
        experts_used(model, score)
    for seed in range(100, 200):  # a prompt that reaches an expert of the last MoE layer none of the others use
        (bad,) = prompts([20], seed=seed)
        hit = sorted(e for l, e in experts_used(model, greedy(bad, 0)) if l == last and (l, e) not in innocent)
        if hit:
            break
    else:
        pytest.fail("no prompt reaches an expert the well-formed sequences never use")

    def run(moe, with_culprit):
        engine = Engine(with_moe(model, moe), micro_batches=2, kv_tier=DictTier())
        runs = count_runs(engine)
        seqs = [engine.add(greedy(a, 10)), engine.add(Request(b, seeded))]
        engine.step(), engine.step()  # prefills, then a decode: their next step holds earlier KV and tier saves
        seqs.append(engine.add(score))
        culprit = engine.add(greedy(bad, 10)) if with_culprit else None
        while engine.has_work:
            engine.step()
        assert engine.cache.num_free_blocks() == engine.cache.num_blocks
        return engine, runs, seqs, culprit

    undisturbed, _, clean, _ = run(model.moe, with_culprit=False)
    engine, runs, seqs, culprit = run(RefusingMoE(model.moe, last, hit[0]), with_culprit=True)
    assert culprit.finish_reason == "error" and not culprit.retryable
    assert culprit.error == f"the experts refused this sequence's rows: expert output overflowed in layer {last}"
    assert [s.output_ids for s in seqs] == [s.output_ids for s in clean]
    assert [s.finish_reason for s in seqs] == ["length"] * 3
    assert torch.allclose(torch.tensor(seqs[2].prompt_logprobs[1:]), torch.tensor(clean[2].prompt_logprobs[1:]),
                          atol=1e-5)
    assert runs[:3] == [2, 2, -4] and runs[3:7] == [2, -2, 1, -1]  # the refused step: 2 halvings, 4 re-runs
    saved, reference = engine.kv_tier.entries, undisturbed.kv_tier.entries
    assert saved.keys() == reference.keys()  # nothing of the culprit's, nothing from a refused attempt
    assert all(torch.allclose(saved[k], reference[k], atol=1e-5) for k in saved)
    assert engine.tokens_computed == undisturbed.tokens_computed


def test_when_every_exchange_is_refused_the_search_is_bounded_and_the_engine_goes_on(model):
    moe = RefusingMoE(model.moe)
    engine = Engine(with_moe(model, moe))
    runs = count_runs(engine)
    ps = prompts([9, 10, 11, 12, 13, 14, 15, 16], seed=30)
    seqs = [engine.add(greedy(p, 4)) for p in ps]
    engine.step()
    moe.refuse_all = True
    engine.step()
    reruns = runs[2:]
    assert runs[1] == -8 and len(reruns) == ISOLATION_RUNS_PER_HALVING * 3  # the cap: 4 re-runs per halving
    assert all(s.finish_reason == "error" for s in seqs)
    refused = [s for s in seqs if "experts refused" in s.error]
    assert refused and all(not s.retryable for s in refused)  # each was refused on its own
    assert all(s.retryable and s.error.startswith("model step failed: expert output overflowed")
               for s in seqs if s not in refused)  # unresolved within the cap
    assert engine.cache.num_free_blocks() == engine.cache.num_blocks
    moe.refuse_all = False
    (p,) = prompts([12], seed=31)
    assert engine.run([greedy(p, 6)])[0].output_ids == solo(model, p, max_tokens=6).output_ids


def test_a_failure_of_the_cluster_fails_the_step_without_re_runs(model):
    moe = RefusingMoE(model.moe)
    engine = Engine(with_moe(model, moe))
    runs = count_runs(engine)
    seqs = [engine.add(greedy(p, 4)) for p in prompts([9, 10, 11], seed=32)]
    moe.fault = RuntimeError("router unavailable")
    engine.step()
    assert runs == [-3]
    assert all(s.retryable and s.error == "model step failed: router unavailable" for s in seqs)
