"""Micro-batches: the split at sequence boundaries, and a split step equal to the whole step
(tokens, logprobs, scores, route traces), with its exchanges pipelined in submit order."""
import threading

import pytest
import torch

from llama4.checkpoint import Checkpoint
from llama4.engine import AUTO_MICRO_BATCH_TOKENS, Engine, Request, auto_micro_batches
from llama4.errors import HerdInputError
from llama4.model import Llama4Model
from llama4.moe import LocalMoE
from llama4.sampling import SamplingParams
from llama4.scheduler import split_batch


@pytest.fixture(scope="module")
def model(reference_models):
    return Llama4Model.load(Checkpoint(reference_models["tiny-maverick"][1]))


def prompts(lengths, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("sizes,parts,want", [
    ([1] * 8, 2, [(0, 4), (4, 8)]),
    ([512] * 4, 2, [(0, 2), (2, 4)]),
    ([1] * 3, 2, [(0, 2), (2, 3)]),
    ([7], 2, [(0, 1)]),  # one sequence is never cut
    ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),  # a long prefill alone
    ([1, 1, 1, 100], 2, [(0, 3), (3, 4)]),
    ([5, 5], 4, [(0, 1), (1, 2)]),  # no empty micro-batch
    ([3, 3, 3], 1, [(0, 3)]),
])
def test_split_keeps_whole_sequences_in_order_and_balances_tokens(sizes, parts, want):
    assert split_batch(sizes, parts) == want


def test_split_covers_every_sequence_once():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        sizes = torch.randint(1, 64, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen).tolist()
        parts = int(torch.randint(1, 6, (1,), generator=gen))
        cuts = split_batch(sizes, parts)
        assert cuts[0][0] == 0 and cuts[-1][1] == len(sizes) and len(cuts) == min(parts, len(sizes))
        assert all(a < b for a, b in cuts) and all(b == c for (_, b), (c, _) in zip(cuts, cuts[1:], strict=False))
        if parts == 2 and len(sizes) >= 2:  # no other cut evens the halves more
            (_, cut), _ = cuts
            gaps = [abs(sum(sizes[:c]) - sum(sizes[c:])) for c in range(1, len(sizes))]
            assert gaps[cut - 1] == min(gaps)


class Pipelined:
    """A remote-like backend over LocalMoE: results come from a thread, and the order of submits
    and results and the most exchanges in flight at once are recorded."""

    is_remote = True

    def __init__(self, local: LocalMoE):
        self.local, self.in_flight, self.max_in_flight, self.log = local, 0, 0, []
        self.lock = threading.Lock()

    def submit(self, layer, x):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            n = len(self.log)
            self.log.append(("submit", n))
        box = {}
        t = threading.Thread(target=lambda: box.update(y=self.local.submit(layer, x).result()))
        t.start()
        owner = self

        class Pending:
            def result(self):
                t.join()
                with owner.lock:
                    owner.in_flight -= 1
                    owner.log.append(("result", n))
                return box["y"]

        return Pending()


def run(model, reqs, **kw):
    engine = Engine(model, **kw)
    seqs = [engine.add(r) for r in reqs]
    parts = []
    while engine.has_work:
        engine.step()
        assert not [s.error for s in seqs if s.error]
        parts.append(engine.last_step.num_micro_batches)
    return seqs, parts


def requests(ps, **kw):
    return [Request(p, SamplingParams(max_tokens=12, ignore_eos=True, **kw), trace_routes=True) for p in ps]


@pytest.mark.parametrize("parts", [2, 3])
def test_split_steps_equal_whole_steps(model, parts):
    ps = prompts([5, 40, 77, 12, 3, 30])
    want, _ = run(model, requests(ps), max_step_tokens=64, micro_batches=1)
    remote = Llama4Model(model.cfg, model.w, Pipelined(model.moe), model.dtype, model.device)
    got, used = run(remote, requests(ps), max_step_tokens=64, micro_batches=parts)
    assert max(used) == parts and remote.moe.max_in_flight == parts
    for a, b in zip(want, got, strict=True):
        assert a.output_ids == b.output_ids
        assert torch.allclose(torch.tensor(a.output_logprobs), torch.tensor(b.output_logprobs), atol=1e-5)
    # Answers are collected in the order they were submitted.
    results = [n for kind, n in remote.moe.log if kind == "result"]
    assert results == sorted(results)


def test_split_scores_and_route_traces_equal_whole(model):
    ps = prompts([20, 33, 9])
    score = lambda mb: run(model, [Request(p, SamplingParams(max_tokens=0), prompt_logprobs=True) for p in ps],
                           micro_batches=mb)[0]
    for a, b in zip(score(1), score(3), strict=True):
        assert torch.allclose(torch.tensor(a.prompt_logprobs[1:]), torch.tensor(b.prompt_logprobs[1:]), atol=1e-5)
    engine_traces = []
    for mb in (1, 2):
        engine = Engine(model, micro_batches=mb)
        seqs = [engine.add(r) for r in requests(ps)]
        traces = []
        while engine.has_work:
            traces += [(ev.seq.id, ev.route) for ev in engine.step() if ev.route]
        engine_traces.append(traces)
        assert all(s.finish_reason == "length" for s in seqs)
    assert engine_traces[0] == engine_traces[1]


def test_auto_splits_only_large_steps_of_a_remote_backend_on_an_accelerator(model):
    big = AUTO_MICRO_BATCH_TOKENS
    assert auto_micro_batches(True, "cuda:0", 2, big) == 2
    assert auto_micro_batches(True, "cuda", big, big - 1) == 1  # too few tokens to pay for a second exchange
    assert auto_micro_batches(True, "cuda", 1, 4 * big) == 1  # one sequence is never cut
    assert auto_micro_batches(False, "cuda", 8, 4 * big) == 1  # in-process experts: nothing to overlap
    assert auto_micro_batches(True, "cpu", 8, 4 * big) == 1  # attention and experts share the cores (measured)
    remote = Llama4Model(model.cfg, model.w, Pipelined(model.moe), model.dtype, model.device)
    _, used = run(remote, requests(prompts([40, 40, 40])))
    assert set(used) == {1}


def test_a_failing_sequence_in_a_split_step_fails_alone(model):
    ps = prompts([10, 14, 8, 11], seed=9)
    want, _ = run(model, requests(ps), micro_batches=1)
    engine = Engine(model, micro_batches=2)
    seqs = [engine.add(r) for r in requests(ps[:1], temperature=0.8, seed=1) + requests(ps[1:])]
    seqs[0].generator = "not a generator"  # any failure inside one sequence's sampling
    while engine.has_work:
        engine.step()
    assert seqs[0].finish_reason == "error" and "sampling failed" in seqs[0].error
    assert [s.output_ids for s in seqs[1:]] == [s.output_ids for s in want[1:]]
    assert engine.cache.num_free_blocks() == engine.cache.num_blocks


def test_a_failed_exchange_fails_its_step_and_every_exchange_is_collected(model):
    pipelined = Pipelined(model.moe)
    remote = Llama4Model(model.cfg, model.w, pipelined, model.dtype, model.device)
    submit, calls = pipelined.submit, []

    def flaky(layer, x):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("router unavailable")
        return submit(layer, x)

    pipelined.submit = flaky
    engine = Engine(remote, micro_batches=2)
    seqs = [engine.add(r) for r in requests(prompts([6, 7]))]
    engine.step()
    assert all(s.finish_reason == "error" and "router unavailable" in s.error for s in seqs)
    assert pipelined.in_flight == 0  # the first micro-batch's exchange was still collected


@pytest.mark.parametrize("value", [0, 9, "2", 1.5, "many", True])
def test_micro_batches_is_validated_naming_the_field(model, value):
    with pytest.raises(HerdInputError, match=r"batching\.micro_batches"):
        Engine(model, micro_batches=value)
