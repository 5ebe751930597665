"""A sequence whose rows the expert workers refuse fails alone, on a real local cluster.

The checkpoint is tiny-maverick with one expert of the first MoE layer blown up (gate_up x 1e30):
a row routed to it overflows fp32 on its worker, which refuses the exchange (INVALID_ARGUMENT).
The culprit's prompt reaches that expert in its prefill; the well-formed streams running beside
it never do, so they must get exactly their undisturbed tokens."""
import shutil
import threading

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.client import Client
from herdpb import llama_pb2, router_pb2, router_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import resolve_model
from plumbing.grpc_server import channel

MODEL = "tiny-maverick"  # as the local_cluster fixture (tests/conftest.py)
BLOW_UP = 1e30  # gate_up of the sabotaged expert: silu(g) * u ~ 1e58 overflows fp32
GOOD_TOKENS = 64


def ids(n, seed):
    return torch.randint(3, 200000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(prompt, max_tokens):
    return Request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def experts_hit(model, layer, request):
    """The experts of MoE layer `layer` that a request's rows reach, run alone (monolithic)."""
    counts = model.moe.tokens_per_expert[layer]
    counts.zero_()
    Engine(model).run([request])
    return set(torch.nonzero(counts).flatten().tolist())


@pytest.fixture(scope="module")
def crafted(herd_home, tmp_path_factory):
    """(checkpoint dir, the good prompts and their undisturbed tokens, the culprit's prompt)."""
    source = resolve_model(MODEL)
    model = Llama4Model.load(Checkpoint(source))
    layer = model.cfg.moe_layer_list[0]  # so that the monolithic model's logits see the overflow too
    goods = [ids(20, 1), ids(24, 2)]
    expected = [Engine(model).run([greedy(p, GOOD_TOKENS)])[0].output_ids for p in goods]
    used = set().union(*(experts_hit(model, layer, greedy(p, GOOD_TOKENS)) for p in goods))
    for seed in range(100, 200):
        culprit = ids(20, seed)
        free = sorted(experts_hit(model, layer, greedy(culprit, 0)) - used)
        if free:
            break
    else:
        pytest.fail("no prompt reaches an expert the good prompts never use")
    out = tmp_path_factory.mktemp("overflowing-maverick")
    shutil.copytree(source, out, dirs_exist_ok=True)
    (weights,) = out.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith(f"layers.{layer}.feed_forward.experts.gate_up_proj"))
    tensors[name][free[0]] *= BLOW_UP
    save_file(tensors, weights, metadata={"format": "pt"})
    return out, layer, goods, expected, culprit


@pytest.fixture(scope="module")
def cluster(local_cluster, crafted):
    with local_cluster(model=str(crafted[0]), workers=2, route_timeout_s=90.0) as c:
        yield c


def _request(prompt, max_tokens):
    req = llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=prompt))
    req.sampling.max_tokens, req.sampling.ignore_eos = max_tokens, True
    return req


def test_the_monolithic_model_fails_only_the_culprit(crafted):
    """The reference behaviour the cluster must match: the in-process experts refuse an output that
    overflowed as a worker does, and the refused sequence fails alone with the same words."""
    path, layer, goods, expected, culprit = crafted
    model = Llama4Model.load(Checkpoint(path))
    seqs = Engine(model).run([greedy(goods[0], GOOD_TOKENS), greedy(culprit, 8), greedy(goods[1], GOOD_TOKENS)])
    assert seqs[1].finish_reason == "error"
    assert seqs[1].error == f"the experts refused this sequence's rows: expert output overflowed for layer {layer}"
    assert [seqs[0].output_ids, seqs[2].output_ids] == expected


def test_a_sequence_the_experts_refuse_fails_alone_beside_streams_that_go_on(cluster, crafted):
    _, layer, goods, expected, culprit = crafted
    client = Client(cluster.attention_address)
    started = [threading.Event() for _ in goods]
    results: list = [None] * len(goods)
    progress = [[] for _ in goods]

    def stream(i):
        out = progress[i]
        try:
            for msg in client.stub.Generate(_request(goods[i], GOOD_TOKENS), timeout=120):
                out.extend(msg.token_ids)
                started[i].set()
            results[i] = out
        except grpc.RpcError as exc:
            results[i] = exc
        finally:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(goods))]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)  # both decode when the culprit's prefill joins their step
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(_request(culprit, 8), timeout=60))
    assert all(len(p) < GOOD_TOKENS for p in progress)  # the culprit's steps were theirs too
    for t in threads:
        t.join(120)
    assert err.value.code() == grpc.StatusCode.INTERNAL  # the request's fault: not UNAVAILABLE (retry)
    details = err.value.details()
    assert details.startswith("the experts refused this sequence's rows:") and \
        f"expert output overflowed for layer {layer}" in details, details
    assert results == expected  # token for token, greedy, as if the culprit never came

    # The cluster keeps serving: no worker was marked down, the culprit is refused again, others run.
    router = router_pb2_grpc.RouterStub(channel(cluster.router_address, secret=cluster.cluster_token))
    assert all(w.healthy for w in router.Status(router_pb2.RouterStatusRequest(), timeout=10).workers)
    with pytest.raises(grpc.RpcError) as again:
        list(client.stub.Generate(_request(culprit, 8), timeout=60))
    assert again.value.code() == grpc.StatusCode.INTERNAL
    tokens = [t for msg in client.stub.Generate(_request(goods[0], GOOD_TOKENS), timeout=120) for t in msg.token_ids]
    assert tokens == expected[0]
