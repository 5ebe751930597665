"""DirectMoE (dispatch: direct) against real expert worker servers on loopback, fed by a real
router (real Redis) or by a stand-in router whose WatchPlacement pushes scripted tables: rows
gated here equal the local computation; before a first table an exchange waits and the service
is not ready; a table it cannot use is refused alone (the last good one kept, the stream and
the exchanges going on); a dead worker's rows are rerouted; the stream is reopened; refused rows
are RowsRefused; the load goes back to the router in reports."""
import queue
import socket
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_svc.direct_moe import DirectMoE
from attention_svc.server import build, serve
from expert_svc.server import serve as serve_worker
from herd.redis_server import RedisServer
from herdpb import llama_pb2, llama_pb2_grpc, router_pb2, router_pb2_grpc
from kernels import grouped_expert_ffn, route_top1
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.model import Llama4Model
from llama4.moe import RowsRefused
from llama4.sampling import SamplingParams
from llama4.weights import load_experts, load_gates
from plumbing.grpc_server import channel, start_server, wait_serving
from plumbing.registry import WorkerRegistry
from router_svc.server import serve as serve_router

LAYER, EXPERTS, ROWS = 1, 128, 48
EVENS, ODDS, ALL = list(range(0, EXPERTS, 2)), list(range(1, EXPERTS, 2)), list(range(EXPERTS))


class StandInRouter(router_pb2_grpc.RouterServicer):
    """A router that pushes whatever the test puts on each opened stream's queue (None ends the
    stream) and keeps every report it is sent; Status names the model."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.opened: queue.Queue = queue.Queue()  # one table queue per WatchPlacement opened
        self.reports: list = []

    def WatchPlacement(self, request_iterator, context):
        tables: queue.Queue = queue.Queue()
        self.opened.put(tables)
        threading.Thread(target=self._read, args=(request_iterator,), daemon=True).start()
        while context.is_active():
            try:
                table = tables.get(timeout=0.05)
            except queue.Empty:
                continue
            if table is None:
                return
            yield table

    def _read(self, reports) -> None:
        try:
            for report in reports:
                self.reports.append(report)
        except grpc.RpcError:  # the stream ended
            pass

    def Status(self, request, context):
        return router_pb2.RouterStatus(fingerprint=self.fingerprint)


@pytest.fixture(scope="module")
def setup(reference_models):
    path = reference_models["tiny-maverick"][1]
    servers, addresses, fingerprint = [], [], None
    for experts in (EVENS, ODDS, ALL):
        server, port, servicer = serve_worker(str(path), experts, torch.float32, "cpu")
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
        fingerprint = servicer.fingerprint
    ckpt = Checkpoint(path)
    w13, w2 = load_experts(ckpt, ALL, torch.float32, "cpu")[LAYER]
    gate = load_gates(ckpt, torch.float32, "cpu")[LAYER]
    try:
        yield path, addresses, fingerprint, (gate, w13, w2)
    finally:
        for server in servers:
            server.stop(0)


@pytest.fixture()
def stand_in(setup):
    path, addresses, fingerprint, _ = setup
    router = StandInRouter(fingerprint)
    server, port, _ = start_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s),
                                   ["herd.v1.Router"])
    moes = []

    def direct(**kw):
        moe = DirectMoE(Checkpoint(path), f"127.0.0.1:{port}", torch.float32, fingerprint, **kw)
        moes.append(moe)
        return moe, router.opened.get(timeout=10)

    try:
        yield router, direct, f"127.0.0.1:{port}"
    finally:
        for moe in moes:
            moe.close()
        server.stop(0)


def table(version, fingerprint, *workers, num_experts=EXPERTS):
    """workers: (index, address, experts[, healthy])."""
    t = router_pb2.PlacementTable(version=version, fingerprint=fingerprint, num_experts=num_experts)
    for index, address, experts, *healthy in workers:
        t.workers.add(index=index, address=address, experts=experts, healthy=healthy[0] if healthy else True)
    return t


def _x(seed, rows=ROWS, h=None):
    return torch.randn(rows, h, generator=torch.Generator().manual_seed(seed))


def _want(x, gate, w13, w2):
    ids, scaled = route_top1(x, gate)
    return ids, grouped_expert_ffn(scaled, ids, w13, w2)


def _until(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_an_exchange_waits_for_the_first_table_then_equals_local_and_is_reported(setup, stand_in):
    path, addresses, fingerprint, (gate, w13, w2) = setup
    router, direct, _ = stand_in
    moe, tables = direct(timeout=20.0)
    x = _x(1, h=gate.shape[1])
    ids, want = _want(x, gate, w13, w2)
    assert "no placement table" in moe.not_ready()
    pending = moe.submit(LAYER, x)  # before any table: it waits, it does not fail
    time.sleep(0.5)
    tables.put(table(1, fingerprint, (0, addresses[0], EVENS), (1, addresses[1], ODDS)))
    routed = pending.result()
    assert torch.allclose(routed.y, want, atol=1e-6)
    assert routed.route.expert_ids.tolist() == ids.tolist() and routed.route.workers.tolist() == (ids % 2).tolist()
    assert moe.not_ready() == "" and moe.placement.version == 1
    _until(lambda: router.reports)
    (report,) = router.reports
    assert report.routes == 1 and report.retries == report.hedges == 0
    (load,) = report.loads
    assert load.layer == LAYER and list(load.tokens_per_expert) == torch.bincount(ids, minlength=EXPERTS).tolist()
    assert sorted((w.index, w.rpcs, w.rows) for w in report.workers) == \
        [(0, 1, int((ids % 2 == 0).sum())), (1, 1, int((ids % 2 == 1).sum()))]
    time.sleep(1.5)
    assert len(router.reports) == 1  # nothing sent since: nothing reported


def test_a_table_it_cannot_use_is_refused_alone(setup, stand_in):
    path, addresses, fingerprint, (gate, w13, w2) = setup
    router, direct, _ = stand_in
    moe, tables = direct()
    good = table(2, fingerprint, (0, addresses[0], EVENS), (1, addresses[1], ODDS))
    tables.put(good)
    _until(lambda: moe.placement.version == 2)
    x = _x(2, h=gate.shape[1])
    ids, want = _want(x, gate, w13, w2)
    bad = [(table(3, "another-model", (0, addresses[0], EVENS)), "another-model"),
           (table(3, fingerprint, (0, addresses[0], EVENS), num_experts=16), "num_experts=16"),
           (table(3, fingerprint, (0, addresses[0], [0, 999])), "999"),
           (table(3, fingerprint, (0, addresses[0], EVENS), (0, addresses[1], ODDS)), "twice"),
           (table(3, fingerprint, (0, "", EVENS)), "no address"),
           (table(3, fingerprint, (0, addresses[0], [2, 2])), "expert twice"),
           (good, "not newer than v2")]
    for n, (t, why) in enumerate(bad, start=1):
        tables.put(t)
        _until(lambda n=n: moe.tables_refused == n)
        assert why in moe.refusal
        routed = moe.submit(LAYER, x).result()  # the exchanges go on, on the last good table
        assert torch.allclose(routed.y, want, atol=1e-6) and routed.route.workers.tolist() == (ids % 2).tolist()
        assert moe.placement.version == 2 and moe.not_ready() == ""
    # The same stream goes on: the next good table is taken (worker 0 down, a replica of everything added).
    tables.put(table(3, fingerprint, (0, addresses[0], EVENS, False), (1, addresses[1], ODDS), (2, addresses[2], ALL)))
    _until(lambda: moe.placement.version == 3)
    assert router.opened.empty()  # never reopened
    routed = moe.submit(LAYER, x).result()
    assert torch.allclose(routed.y, want, atol=1e-6)
    assert 0 not in routed.route.workers.tolist() and 2 in routed.route.workers.tolist()


def test_a_dead_workers_rows_are_rerouted_and_the_retry_reported(setup, stand_in):
    path, addresses, fingerprint, (gate, w13, w2) = setup
    router, direct, _ = stand_in
    moe, tables = direct()
    with socket.socket() as s:  # nothing listens here: calls fail UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    # The dead one holds every expert and is the first choice for the odd ones (replica e % 2).
    tables.put(table(1, fingerprint, (0, addresses[0], EVENS), (1, addresses[1], ODDS), (2, dead, ALL)))
    _until(lambda: moe.placement.version == 1)
    x = _x(3, h=gate.shape[1])
    ids, want = _want(x, gate, w13, w2)
    routed = moe.submit(LAYER, x).result()
    assert torch.allclose(routed.y, want, atol=1e-6)
    assert routed.route.workers.tolist() == (ids % 2).tolist()  # never the dead one
    assert moe.dispatcher.retries == 1 and not moe.placement.workers[2].healthy
    _until(lambda: sum(r.retries for r in router.reports) == 1)
    assert sum(r.rerouted_rows for r in router.reports) == int((ids % 2 == 1).sum())


def test_the_stream_is_reopened_when_it_ends(setup, stand_in):
    path, addresses, fingerprint, (gate, w13, w2) = setup
    router, direct, _ = stand_in
    moe, tables = direct()
    tables.put(table(5, fingerprint, (0, addresses[0], EVENS), (1, addresses[1], ODDS)))
    _until(lambda: moe.placement.version == 5)
    tables.put(None)  # the router ends the stream (a restart, say)
    again = router.opened.get(timeout=5)
    x = _x(4, h=gate.shape[1])
    ids, want = _want(x, gate, w13, w2)
    assert torch.allclose(moe.submit(LAYER, x).result().y, want, atol=1e-6)  # the last table serves meanwhile
    again.put(table(1, fingerprint, (0, addresses[0], EVENS), (1, addresses[1], ODDS)))  # a new router counts anew
    _until(lambda: moe.placement.version == 1)
    assert moe.tables_refused == 0
    _until(lambda: router.reports)  # what was sent is reported on the new stream
    assert sum(r.routes for r in router.reports) == 1


def test_rows_that_cannot_be_computed_are_refused_and_the_next_exchange_serves(setup, stand_in):
    path, addresses, fingerprint, (gate, w13, w2) = setup
    router, direct, _ = stand_in
    moe, tables = direct()
    tables.put(table(1, fingerprint, (0, addresses[0], EVENS), (1, addresses[1], ODDS)))
    _until(lambda: moe.placement.version == 1)
    h = gate.shape[1]
    with pytest.raises(RowsRefused, match="overflowed"):  # the worker refuses an expert output that overflowed
        moe.submit(LAYER, torch.full((8, h), 1e30)).result()
    nan = _x(5, h=h)
    nan[2, 3] = float("nan")
    with pytest.raises(RowsRefused, match="NaN"):  # refused here, as the router refuses it
        moe.submit(LAYER, nan).result()
    x = _x(6, h=h)
    assert torch.allclose(moe.submit(LAYER, x).result().y, _want(x, gate, w13, w2)[1], atol=1e-6)


def test_with_a_real_router_the_load_is_counted_by_the_router(setup, reference_models):
    path, addresses, fingerprint, (gate, w13, w2) = setup
    redis = RedisServer(policy="noeviction")
    registry = WorkerRegistry(redis.url, "direct")
    registry.publish(0, {"address": addresses[0], "experts": EVENS, "fingerprint": fingerprint})
    registry.publish(1, {"address": addresses[1], "experts": ODDS, "fingerprint": fingerprint})
    server, port, router = serve_router(str(path), torch.float32, redis.url, "direct")
    moe = DirectMoE(Checkpoint(path), f"127.0.0.1:{port}", torch.float32, fingerprint)
    try:
        wait_serving(f"127.0.0.1:{port}", 30)
        _until(lambda: moe.placement.version >= 1 and len(moe.placement.workers) == 2)
        before = moe.router_status()
        xs = [_x(10 + i, h=gate.shape[1]) for i in range(3)]
        for x in xs:
            ids, want = _want(x, gate, w13, w2)
            routed = moe.submit(LAYER, x).result()
            assert torch.allclose(routed.y, want, atol=1e-6)
            assert routed.route.workers.tolist() == (ids % 2).tolist()
        _until(lambda: moe.router_status().routes == before.routes + 3)
        after = moe.router_status()
        assert router.coalescer.batches == 0  # the router itself dispatched nothing
        want_load = sum(torch.bincount(route_top1(x, gate)[0], minlength=EXPERTS) for x in xs).tolist()
        (load_before,) = [list(load.tokens_per_expert) for load in before.loads if load.layer == LAYER]
        (load_after,) = [list(load.tokens_per_expert) for load in after.loads if load.layer == LAYER]
        assert [a - b for a, b in zip(load_after, load_before, strict=True)] == want_load
        assert sum(w.rows for w in after.workers) - sum(w.rows for w in before.workers) == 3 * ROWS
        assert after.worker_rpcs - before.worker_rpcs == 6
    finally:
        moe.close()
        server.stop(0)
        redis.stop()


def test_the_attention_service_is_not_ready_until_a_table_comes_and_then_serves(setup, stand_in):
    path, addresses, fingerprint, _ = setup
    router, _, address = stand_in
    servicer, moe = build(str(path), address, torch.float32, "cpu", {}, route_timeout=30.0, dispatch="direct")
    server, port = serve(servicer)
    try:
        assert isinstance(moe, DirectMoE)
        tables = router.opened.get(timeout=10)
        health = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{port}"))
        check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        prompt = [1, 17, 400, 33, 9]
        mono = Llama4Model.load(Checkpoint(path))
        (want,) = Engine(mono).run([Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))])
        stub = llama_pb2_grpc.LlamaStub(channel(f"127.0.0.1:{port}"))
        req = llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=prompt))
        req.sampling.max_tokens, req.sampling.ignore_eos = 6, True
        got = []
        early = threading.Thread(target=lambda: got.extend(t for m in stub.Generate(req, timeout=60)
                                                           for t in m.token_ids), daemon=True)
        early.start()  # a client that came before the table: it waits, it is not failed
        time.sleep(2.5)  # two readiness checks
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING and "placement" in servicer.readiness.reason
        assert not got
        tables.put(table(1, fingerprint, (0, addresses[0], EVENS), (1, addresses[1], ODDS)))
        _until(lambda: check() == health_pb2.HealthCheckResponse.SERVING, timeout=5)
        early.join(60)
        assert got == want.output_ids
        status = stub.Status(llama_pb2.StatusRequest(), timeout=10)
        assert status.dispatch == "direct" and status.placement_version == 1
    finally:
        servicer.readiness.drain()
        server.stop(0)
        moe.close()
