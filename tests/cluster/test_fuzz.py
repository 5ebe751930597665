"""Fuzzing every public and internal method of a real local cluster with generated and
mutated messages (hypothesis): every reply is OK or a proper error status (the router's
placement stream, which answers reports with nothing, stays open through them all), and
afterwards every server is still SERVING and still gives the monolithic model's answers.

Deserialization failures of mutated bytes are answered by gRPC itself with INTERNAL
("Exception deserializing request!"); that is the one INTERNAL accepted.
"""
import os
import queue
import random
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd.client import Client
from herdpb import expert_pb2, expert_pb2_grpc, llama_pb2, llama_pb2_grpc, router_pb2, router_pb2_grpc, tensor_pb2
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.store import resolve_model
from plumbing.grpc_server import channel

MODEL = "tiny-maverick"  # as the local_cluster fixture (tests/conftest.py)

PER_SERVICE = 2000
SCALE = float(os.environ.get("HERD_FUZZ_SCALE", "1"))  # < 1 for a quick local run; CI runs all of it
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ALREADY_EXISTS}  # the last two: sessions that are missing, or exist already
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
COUNTS = {"attention": 0, "router": 0, "worker": 0}


@pytest.fixture(scope="module")
def cluster(local_cluster):
    with local_cluster(workers=2, route_timeout_s=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(cluster):
    token = cluster.cluster_token
    router_ch = channel(cluster.router_address, secret=token)
    attention_ch = channel(cluster.attention_address, secret=cluster.api_key)
    router = router_pb2_grpc.RouterStub(router_ch)
    worker_addr = router.Status(router_pb2.RouterStatusRequest(), timeout=10).workers[0].address
    worker_ch = channel(worker_addr, secret=token)
    return {"attention": llama_pb2_grpc.LlamaStub(attention_ch), "router": router,
            "worker": expert_pb2_grpc.ExpertWorkerStub(worker_ch),
            "channels": {"attention": attention_ch, "router": router_ch, "worker": worker_ch}}


def expect_ok_or_refused(call, service, allow_internal_parse=False):
    COUNTS[service] += 1
    try:
        return call()
    except grpc.RpcError as exc:
        code = exc.code()
        if allow_internal_parse and code == grpc.StatusCode.INTERNAL and "deserializing" in (exc.details() or ""):
            return None
        assert code in REFUSALS, (code, exc.details())
        assert exc.details(), "an error status must say what is wrong"
        return None


# ---- strategies ----
H, E, V = 64, 128, 202048
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
ints = st.one_of(st.integers(-3, V + 3), st.integers(-(2**63), 2**63 - 1))
small_tokens = st.one_of(st.integers(0, 5), st.integers(5000, 2**32 - 1))  # short runs, or refused
SPECIALS = ["<|eot|>", "<|image|>", "<|header_start|>"]
words = st.lists(st.sampled_from(list("ab c\n\u00e9\u4e2d\U0001F600\ud7ff") + SPECIALS), max_size=30).map("".join)


@st.composite
def generate_requests(draw):
    req = llama_pb2.GenerateRequest(request_id=draw(st.sampled_from(["", "same", "x" * 300])))
    which = draw(st.sampled_from(["text", "ids", "chat", "none"]))
    if which == "text":
        req.text = draw(words)
    elif which == "ids":
        req.ids.ids.extend(draw(st.lists(st.one_of(st.integers(0, V - 1), ints), max_size=30)))
    elif which == "chat":
        for role, content in draw(st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "tool", "evil",
                                                                     "", "user<|eot|>"]), words), max_size=4)):
            req.chat.messages.add(role=role, content=content)
    s = req.sampling
    s.max_tokens, s.temperature, s.top_p = draw(small_tokens), draw(f32), draw(f32)
    s.top_k = draw(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    s.stop_token_ids.extend(draw(st.lists(ints, max_size=3)))
    s.ignore_eos = draw(st.booleans())
    if draw(st.integers(0, 9)) == 0:  # a few turns of a few sessions (a session's prompt grows each turn)
        req.session_id = f"fuzz-{draw(st.integers(0, 40))}"
        req.new_session = draw(st.booleans())  # starts one, or ALREADY_EXISTS; without it, NOT_FOUND or a turn
    req.trace_routes = draw(st.booleans())
    return req


@st.composite
def tensors(draw, rows_max=6):
    t = tensor_pb2.Tensor(dtype=draw(st.sampled_from(["float32", "float32", "float32", "bfloat16", "float64", ""])))
    rows = draw(st.integers(0, rows_max))
    cols = draw(st.sampled_from([H, H, H, H - 1, 0, 1]))
    shape = draw(st.sampled_from([[rows, cols], [rows, cols], [rows], [rows, cols, 1], []]))
    t.shape[:] = shape
    if draw(st.booleans()):
        n = rows * cols
        values = draw(st.lists(st.one_of(st.floats(-4, 4, width=32), f32, st.sampled_from([1e30, -3e38])),
                               min_size=n, max_size=n)) if n <= 64 else [0.5] * n
        t.data = torch.tensor(values, dtype=torch.float32).numpy().tobytes()
    else:
        t.data = draw(st.binary(max_size=2048))
    return t


def layers():
    return st.one_of(st.sampled_from([1, 3, 1, 3]), st.integers(-5, 10), st.integers(-(2**31), 2**31 - 1))


# ---- the attention service ----
@settings(max_examples=int(1200 * SCALE), **SETTINGS)
@given(req=generate_requests())
def test_fuzz_generate(stubs, req):
    def call():
        msgs = list(stubs["attention"].Generate(req, timeout=60))
        assert msgs and msgs[-1].finish_reason in ("stop", "length")
        assert all(0 <= t < V for m in msgs for t in m.token_ids)
        return msgs

    expect_ok_or_refused(call, "attention")


@settings(max_examples=int(300 * SCALE), **SETTINGS)
@given(which=st.sampled_from(["text", "ids", "chat"]), text=words, id_list=st.lists(ints, max_size=40))
def test_fuzz_score_and_tokenize(stubs, which, text, id_list):
    score = llama_pb2.ScoreRequest(text=text) if which != "ids" else llama_pb2.ScoreRequest(
        ids=llama_pb2.TokenIds(ids=id_list))
    got = expect_ok_or_refused(lambda: stubs["attention"].Score(score, timeout=60), "attention")
    if got is not None:
        assert len(got.logprobs) == len(got.ids) - 1 and all(lp <= 1e-4 for lp in got.logprobs)
    tok = llama_pb2.TokenizeRequest(text=text) if which != "chat" else llama_pb2.TokenizeRequest(
        chat=llama_pb2.ChatMessages(messages=[llama_pb2.ChatMessage(role="user", content=text)]))
    expect_ok_or_refused(lambda: stubs["attention"].Tokenize(tok, timeout=60), "attention")


def mutations(data: bytes, rng: random.Random, n: int):
    for _ in range(n):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.5 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.75:
                b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
            elif b:
                del b[rng.randrange(len(b)):]
        yield bytes(b)


def raw_calls(ch, method, streaming):
    if streaming:
        return ch.unary_stream(method, request_serializer=None, response_deserializer=None)
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)


def test_fuzz_mutated_bytes_at_every_service(stubs):
    rng = random.Random(7)
    h = torch.randn(3, H).numpy().tobytes()
    gen = llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=[1, 2, 3]))
    gen.sampling.max_tokens = 2
    route = router_pb2.RouteRequest(layer=1, x=tensor_pb2.Tensor(dtype="float32", shape=[3, H], data=h))
    run = expert_pb2.RunExpertsRequest(layer=1, expert_ids=[0, 1, 2],
                                       x=tensor_pb2.Tensor(dtype="float32", shape=[3, H], data=h))
    targets = [("attention", "/herd.v1.Llama/Generate", True, gen, 300),
               ("attention", "/herd.v1.Llama/Score", False, llama_pb2.ScoreRequest(text="the llama"), 200),
               ("router", "/herd.v1.Router/Route", False, route, 500),
               ("worker", "/herd.v1.ExpertWorker/RunExperts", False, run, 500)]
    targets = [(*t[:4], int(t[4] * SCALE)) for t in targets]
    for service, method, streaming, msg, n in targets:
        fn = raw_calls(stubs["channels"][service], method, streaming)
        for data in mutations(msg.SerializeToString(), rng, n):
            send = (lambda d, fn=fn: list(fn(d, timeout=60))) if streaming else (lambda d, fn=fn: fn(d, timeout=60))
            expect_ok_or_refused(lambda send=send, data=data: send(data), service, allow_internal_parse=True)


# ---- the router and a worker ----
@settings(max_examples=int(1500 * SCALE), **SETTINGS)
@given(layer=layers(), x=tensors())
def test_fuzz_route(stubs, layer, x):
    req = router_pb2.RouteRequest(layer=layer, x=x)
    got = expect_ok_or_refused(lambda: stubs["router"].Route(req, timeout=60), "router")
    if got is not None:
        assert list(got.y.shape) == list(x.shape) and len(got.expert_ids) == x.shape[0]


@settings(max_examples=int(1500 * SCALE), **SETTINGS)
@given(layer=layers(), x=tensors(), experts=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 63), max_size=7))
def test_fuzz_run_experts(stubs, layer, x, experts):
    req = expert_pb2.RunExpertsRequest(layer=layer, x=x, expert_ids=experts)
    got = expect_ok_or_refused(lambda: stubs["worker"].RunExperts(req, timeout=60), "worker")
    if got is not None:
        assert list(got.y.shape) == list(x.shape)


class PlacementWatch:
    """One WatchPlacement stream that every fuzzed report goes on, in order; tables read meanwhile."""

    def __init__(self, stub):
        self.reports: queue.Queue = queue.Queue()
        self.tables, self.error, self.sent = [], None, 0
        self.call = stub.WatchPlacement(iter(self.reports.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for table in self.call:
                self.tables.append(table)
        except grpc.RpcError as exc:
            self.error = exc


@pytest.fixture(scope="module")
def watch(stubs):
    w = PlacementWatch(stubs["router"])
    yield w
    w.reports.put(None)
    w.call.cancel()


counts = st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1))


@st.composite
def placement_reports(draw):
    r = router_pb2.PlacementReport(routes=draw(counts), retries=draw(counts), hedges=draw(counts),
                                   rerouted_rows=draw(counts))
    for _ in range(draw(st.integers(0, 3))):
        per_expert = draw(st.one_of(st.lists(st.integers(0, 10), min_size=E, max_size=E), st.lists(counts, max_size=9)))
        r.loads.add(layer=draw(layers()), tokens_per_expert=per_expert)
    for _ in range(draw(st.integers(0, 3))):
        r.workers.add(index=draw(st.one_of(st.integers(0, 2), st.integers(-(2**31), 2**31 - 1))), rpcs=draw(counts),
                      rows=draw(counts))
    return r


@settings(max_examples=int(300 * SCALE), **SETTINGS)
@given(report=placement_reports())
def test_fuzz_placement_reports(watch, report):
    COUNTS["router"] += 1
    watch.sent += 1
    watch.reports.put(report)  # taken or refused alone; the stream must stay open (checked below)


def test_zy_the_placement_stream_outlived_its_reports(cluster, stubs, watch):
    status = lambda: stubs["router"].Status(router_pb2.RouterStatusRequest(), timeout=10)
    deadline = time.monotonic() + 30
    while watch.reports.qsize() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the last ones read
    before = status().routes
    watch.reports.put(router_pb2.PlacementReport(routes=1))
    while status().routes == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status().routes == before + 1 and watch.error is None and watch.reader.is_alive()
    assert watch.tables and watch.tables[0].num_experts == E
    metrics = urllib.request.urlopen(f"http://{cluster.router_metrics_address}/metrics", timeout=5).read().decode()
    (refused,) = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("herd:placement_reports_refused_total ")]
    assert 0 < refused < watch.sent  # the malformed ones, each alone


def test_zz_every_server_still_serves_and_answers_correctly(cluster, stubs):
    assert all(n >= PER_SERVICE * SCALE for n in COUNTS.values()), COUNTS
    for service in ("attention", "router", "worker"):
        health = health_pb2_grpc.HealthStub(stubs["channels"][service])
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING, service
    mono = Llama4Model.load(Checkpoint(resolve_model(MODEL)))
    prompt = torch.randint(3, 200000, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = Engine(mono).run([Request(prompt, SamplingParams(max_tokens=12, ignore_eos=True))])[0]
    got = [t for m in Client(cluster.attention_address).generate(ids=prompt, max_tokens=12, ignore_eos=True)
           for t in m.token_ids]
    assert got == expected.output_ids
