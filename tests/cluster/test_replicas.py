"""Experts with two replicas: a killed worker's rows go at once to the other replica."""
import os
import signal

import pytest
import torch

from herd.client import Client
from herd.deploy import DeployConfig
from herd.up import Cluster
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import resolve_model


@pytest.fixture(scope="module")
def cluster(herd_home):
    cfg = DeployConfig.load(None, model="tiny-maverick", workers=3, replicas=2, attention_port=0, http_port=0,
                            dashboard=False)
    with Cluster(cfg, log=lambda *_: None) as c:
        yield c


def test_replicated_experts_survive_a_killed_worker(cluster, herd_home):
    client = Client(cluster.attention_address)
    st = client.status()
    holders = {}
    for w in st.router.workers:
        for e in w.experts:
            holders.setdefault(e, []).append(w.index)
    assert len(holders) == 128 and all(len(h) == 2 for h in holders.values())
    prompt = torch.randint(3, 200000, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    mono = Llama4Model.load(Checkpoint(resolve_model("tiny-maverick")))
    (expected,) = Engine(mono).run([Request(prompt, SamplingParams(max_tokens=48, ignore_eos=True))])
    pids = cluster.worker_pids()
    got = []
    for msg in client.generate(ids=prompt, max_tokens=48, ignore_eos=True):
        got.extend(msg.token_ids)
        if len(got) == 8:
            os.kill(pids[0], signal.SIGKILL)
    assert got == expected.output_ids
    assert client.status().router.retries >= 1
