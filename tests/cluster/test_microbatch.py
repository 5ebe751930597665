"""Micro-batches through the real cluster: steps cut in two and three, their Route exchanges in
flight together on the one stream, equal to the monolithic model token for token (logprobs and
scores within 1e-5); a request that fails mid-batch fails alone."""
import concurrent.futures

import pytest
import torch

from herd.client import Client
from herd.deploy import DeployConfig
from herd.up import Cluster
from herdpb import llama_pb2
from llama4.engine import Engine, Request
from llama4.sampling import SamplingParams

CLUSTER_MODEL = "tiny-maverick"  # as the mono fixture (tests/conftest.py)


@pytest.fixture(scope="module", params=[2, 3])
def client(request, herd_home):
    cfg = DeployConfig.load(None, model=CLUSTER_MODEL, workers=4, attention_port=0, http_port=0, dashboard=False,
                            route_timeout_s=90.0)
    # Batching has no micro_batches field yet (herd/deploy.py); herd up hands the attention service every attribute.
    cfg.batching.micro_batches = request.param
    with Cluster(cfg, log=lambda *_: None) as cluster:
        yield Client(cluster.attention_address)


def prompts(n, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200000, (int(l),), generator=gen).tolist()
            for l in torch.randint(4, 60, (n,), generator=gen)]


def stream(client, ids, max_tokens, stop_after=None):
    tokens, logprobs = [], []
    req = llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.ignore_eos = max_tokens, True
    call = client.stub.Generate(req, timeout=120)
    for msg in call:
        tokens.extend(msg.token_ids)
        logprobs.extend(msg.logprobs)
        if stop_after is not None and len(tokens) >= stop_after:
            call.cancel()
            break
    return tokens, logprobs


def test_split_steps_equal_monolithic(client, mono):
    ps = prompts(8)
    want = Engine(mono).run([Request(p, SamplingParams(max_tokens=16, ignore_eos=True)) for p in ps])
    before = client.status()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: stream(client, p, 16), ps))
    after = client.status()
    for seq, (tokens, logprobs) in zip(want, got, strict=True):
        assert tokens == seq.output_ids
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(seq.output_logprobs), atol=1e-5)
    # Steps of two or more sequences sent one Route exchange per micro-batch per MoE layer.
    steps, routes = after.steps - before.steps, after.route_rpcs - before.route_rpcs
    assert steps * 2 < routes <= steps * 2 * 3


def test_split_scores_equal_monolithic(client, mono):
    ps = prompts(3, seed=8)
    want = Engine(mono).run([Request(p, SamplingParams(max_tokens=0), prompt_logprobs=True) for p in ps])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda p: client.score(ids=p), ps))
    for seq, resp in zip(want, got, strict=True):
        assert torch.allclose(torch.tensor(list(resp.logprobs)), torch.tensor(seq.prompt_logprobs[1:]), atol=1e-5)


def test_a_request_cancelled_mid_batch_fails_alone(client, mono):
    ps = prompts(6, seed=9)
    want = Engine(mono).run([Request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in ps])
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: stream(client, ps[i], 20, stop_after=4 if i == 2 else None), range(6)))
    assert got[2][0] == want[2].output_ids[: len(got[2][0])]
    for i in (0, 1, 3, 4, 5):
        assert got[i][0] == want[i].output_ids
    assert stream(client, ps[2], 20)[0] == want[2].output_ids  # and the engine serves after
