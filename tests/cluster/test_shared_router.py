"""Two attention services on one router (herd up plus a second attention service with its argv,
dispatch: router, coalescing on): concurrent streams from both equal the monolithic model token
for token, log-probs within 1e-5, whatever the router sent to the workers together."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_direct import prompts, stream

from bench.common import attention_beside
from herd.client import Client
from llama4.engine import Engine, Request
from llama4.sampling import SamplingParams


@pytest.fixture(scope="module")
def cluster(local_cluster):
    with local_cluster(workers=4, route_timeout_s=90.0) as c:
        yield c


def test_two_attention_services_on_one_router_equal_monolithic(cluster, mono):
    services = [Client(cluster.attention_address, timeout=120), attention_beside(cluster, "attention-2", True, {})]
    ps = prompts(12, seed=3)
    want = Engine(mono).run([Request(p, SamplingParams(max_tokens=16, ignore_eos=True)) for p in ps])
    before = services[0].status().router
    with ThreadPoolExecutor(len(ps)) as pool:
        got = list(pool.map(lambda i: stream(services[i % 2], ps[i], 16), range(len(ps))))
    after = services[0].status().router
    for seq, (tokens, logprobs) in zip(want, got, strict=True):
        assert tokens == seq.output_ids
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(seq.output_logprobs), atol=1e-5)
    assert after.routes - before.routes >= 2 * 16  # both services' steps went through this router
