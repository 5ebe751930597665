"""The router's pushed placement (dispatch: direct), on a real router with real worker servers on
loopback and real Redis: the table comes at once and again within a fraction of a second of a
change; reports are added into the counts Status and /metrics show; a malformed report is
refused alone (nothing of it counted) while the stream and the Route exchanges go on."""
import queue
import threading
import time

import grpc
import pytest
import torch
from prometheus_client import generate_latest

from expert_svc.server import serve as serve_worker
from herd.redis_server import RedisServer
from herdpb import router_pb2, router_pb2_grpc
from llama4.checkpoint import Checkpoint
from plumbing.grpc_server import channel, wait_serving
from plumbing.registry import WorkerRegistry
from plumbing.tensor_codec import read_tensor, write_tensor
from router_svc.server import serve as serve_router

LAYER, EXPERTS = 1, 128


@pytest.fixture(scope="module")
def setup(reference_models):
    path = reference_models["tiny-maverick"][1]
    redis = RedisServer(policy="noeviction")
    registry = WorkerRegistry(redis.url, "push")
    servers = []
    for index, experts in enumerate((list(range(0, EXPERTS, 2)), list(range(1, EXPERTS, 2)))):
        server, port, servicer = serve_worker(str(path), experts, torch.float32, "cpu")
        registry.publish(index, {"address": f"127.0.0.1:{port}", "experts": experts,
                                 "fingerprint": servicer.fingerprint})
        servers.append(server)
    router_server, port, router = serve_router(str(path), torch.float32, redis.url, "push")
    address = f"127.0.0.1:{port}"
    wait_serving(address, 30)  # every expert has a live worker
    try:
        yield path, registry, router, address
    finally:
        for server in (router_server, *servers):
            server.stop(0)
        redis.stop()


class Watch:
    """A WatchPlacement stream as an attention service holds it: tables read in the background,
    reports sent when put()."""

    def __init__(self, address: str):
        self.reports: queue.Queue = queue.Queue()
        self.tables: queue.Queue = queue.Queue()
        self.call = router_pb2_grpc.RouterStub(channel(address)).WatchPlacement(iter(self.reports.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for table in self.call:
                self.tables.put(table)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED, exc  # only close() ends it

    def next_table(self, timeout: float = 5.0) -> router_pb2.PlacementTable:
        return self.tables.get(timeout=timeout)

    def close(self) -> None:
        self.reports.put(None)
        self.call.cancel()


def _metric(router, name: str) -> float:
    lines = generate_latest(router.metrics.registry).decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{"))


def _route(router, x):
    req = router_pb2.RouteRequest(layer=LAYER)
    write_tensor(req.x, x)
    resp = router.route(req, timeout=10.0)
    return read_tensor(resp.y, dtype=torch.float32, cols=x.shape[1], max_rows=x.shape[0], exact=True)


def test_the_table_comes_at_once_and_again_on_every_change(setup):
    path, registry, router, address = setup
    start = time.monotonic()
    watch = Watch(address)
    extra = None
    try:
        first = watch.next_table()
        assert time.monotonic() - start < 2.0
        assert first.version >= 1 and first.fingerprint == router.fingerprint and first.num_experts == EXPERTS
        assert [(w.index, list(w.experts), w.healthy, w.overdue) for w in first.workers] == \
            [(0, list(range(0, EXPERTS, 2)), True, False), (1, list(range(1, EXPERTS, 2)), True, False)]
        assert [w.address for w in first.workers] == [router.placement.workers[i].address for i in (0, 1)]
        assert _metric(router, "herd:placement_watchers") == 1
        # A worker that starts and publishes itself is in the next table (the router reads the registry every 0.5 s).
        extra, port, servicer = serve_worker(str(path), list(range(EXPERTS)), torch.float32, "cpu")
        registry.publish(2, {"address": f"127.0.0.1:{port}", "experts": list(range(EXPERTS)),
                             "fingerprint": servicer.fingerprint})
        grown = watch.next_table()
        assert grown.version > first.version and [w.index for w in grown.workers] == [0, 1, 2]
        assert grown.workers[2].address == f"127.0.0.1:{port}" and grown.workers[2].healthy
        # It dies: marked down (as the router's dispatch or its probe marks it), pushed at once.
        extra.stop(0)
        router.loop.run(_mark_down(router, 2))
        changed = time.monotonic()
        down = watch.next_table()
        # Checked every PUSH_CHECK_S (0.1 s); the rest is scheduling on a loaded 2-core machine.
        assert time.monotonic() - changed < 1.0
        assert down.version > grown.version and not down.workers[2].healthy
        assert down.workers[0].healthy and down.workers[1].healthy
        assert _metric(router, "herd:placement_table_version") == down.version
        with pytest.raises(queue.Empty):
            watch.next_table(timeout=1.0)  # nothing changed since: nothing pushed
    finally:
        watch.close()
    deadline = time.monotonic() + 5
    while _metric(router, "herd:placement_watchers") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(router, "herd:placement_watchers") == 0


async def _mark_down(router, index):
    router.placement.workers[index].mark_down()


def _publish_alias(registry, router, index):
    """Publish worker `index` at worker 0's address, holding what it holds: a change that stays."""
    registry.publish(index, {"address": router.placement.workers[0].address, "experts": list(range(0, EXPERTS, 2)),
                             "fingerprint": router.fingerprint})


def _next_with(watch, index):
    """The first table pushed that names worker `index`."""
    while True:
        table = watch.next_table()
        if index in [w.index for w in table.workers]:
            return table


def _report(**kw):
    report = router_pb2.PlacementReport(routes=kw.pop("routes", 0), retries=kw.pop("retries", 0),
                                        hedges=kw.pop("hedges", 0), rerouted_rows=kw.pop("rerouted", 0))
    for layer, counts in kw.pop("loads", {}).items():
        report.loads.add(layer=layer, tokens_per_expert=counts)
    for index, (rpcs, rows) in kw.pop("workers", {}).items():
        report.workers.add(index=index, rpcs=rpcs, rows=rows)
    assert not kw
    return report


def _counts(address):
    st = router_pb2_grpc.RouterStub(channel(address)).Status(router_pb2.RouterStatusRequest(), timeout=10)
    loads = {load.layer: list(load.tokens_per_expert) for load in st.loads}
    workers = {w.index: (w.rpcs, w.rows) for w in st.workers}
    return {"routes": st.routes, "retries": st.retries, "hedges": st.hedges, "worker_rpcs": st.worker_rpcs,
            "loads": loads, "workers": workers}


def test_reports_are_counted_and_a_malformed_one_is_refused_alone(setup):
    path, registry, router, address = setup
    h = Checkpoint(path).config.hidden_size
    watch = Watch(address)
    try:
        watch.next_table()
        before, refused = _counts(address), _metric(router, "herd:placement_reports_refused_total")
        load = [0] * EXPERTS
        load[3], load[8] = 5, 2
        good = _report(routes=2, retries=1, hedges=1, rerouted=4, loads={LAYER: load}, workers={0: (1, 2), 1: (1, 5)})
        bad = [_report(loads={0: load}),  # a dense layer
               _report(loads={LAYER: load[:-1]}),  # one count short
               _report(loads={LAYER: load}, workers={7: (1, 1)}),  # a worker the router does not know
               _report(loads={LAYER: load}, workers={0: (1, 1), 1: (2, 1 << 41)}),  # a count out of range
               _report(workers={0: (1, 1)}, routes=1 << 62),
               router_pb2.PlacementReport(loads=[router_pb2.LayerLoad(layer=LAYER, tokens_per_expert=load)] * 2)]
        x = torch.randn(6, h, generator=torch.Generator().manual_seed(3))
        want = _route(router, x)
        watch.reports.put(good)
        for report in bad:
            watch.reports.put(report)
            assert torch.equal(_route(router, x), want)  # the Route exchanges go on meanwhile
        watch.reports.put(good)
        deadline = time.monotonic() + 5
        while _metric(router, "herd:placement_reports_refused_total") < refused + len(bad) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the last good one, read after the refused ones
        after = _counts(address)
        assert _metric(router, "herd:placement_reports_refused_total") == refused + len(bad)
        # Two good reports counted, nothing of the refused ones (the Routes above count as the router's own).
        routed = len(bad) + 1
        assert after["routes"] - before["routes"] == 2 * 2 + routed
        assert after["retries"] - before["retries"] == 2 and after["hedges"] - before["hedges"] == 2
        got = [a - b for a, b in zip(after["loads"][LAYER], before["loads"][LAYER], strict=True)]
        assert got[3] >= 10 and got[8] >= 4 and sum(got) == 14 + routed * 6
        assert after["workers"][0][1] - before["workers"][0][1] >= 4
        assert after["workers"][1][1] - before["workers"][1][1] >= 10
        # The stream is still open: it pushes the next change.
        _publish_alias(registry, router, 3)
        assert 3 in [w.index for w in _next_with(watch, 3).workers]
    finally:
        watch.close()


def test_a_bug_hit_by_a_report_fails_that_report_alone(setup, monkeypatch):
    from router_svc import push

    path, registry, router, address = setup
    calls = []

    def broken(servicer, report):
        calls.append(report)
        if len(calls) == 1:
            raise KeyError("boom")
        return check(servicer, report)

    check = push.check_report
    monkeypatch.setattr(push, "check_report", broken)
    watch = Watch(address)
    try:
        first = watch.next_table()
        refused = _metric(router, "herd:placement_reports_refused_total")
        routes = router.routes
        watch.reports.put(_report(routes=3))
        watch.reports.put(_report(routes=4))
        deadline = time.monotonic() + 5
        while router.routes < routes + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.routes == routes + 4 and _metric(router, "herd:placement_reports_refused_total") == refused + 1
        _publish_alias(registry, router, 4)
        assert _next_with(watch, 4).version > first.version
    finally:
        watch.close()


def test_watch_placement_needs_the_cluster_token_when_the_router_has_one(reference_models):
    path = reference_models["tiny-maverick"][1]
    redis = RedisServer(policy="noeviction")
    server, port, _ = serve_router(str(path), torch.float32, redis.url, "push-auth", token="t-" + "x" * 30)
    try:
        call = router_pb2_grpc.RouterStub(channel(f"127.0.0.1:{port}")).WatchPlacement(iter(()), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = router_pb2_grpc.RouterStub(channel(f"127.0.0.1:{port}", secret="t-" + "x" * 30)).WatchPlacement(
            iter(()), timeout=10)
        table = next(call)
        assert table.version >= 1 and not table.workers  # no worker registered yet: an empty table, still a table
        call.cancel()
    finally:
        server.stop(0)
        redis.stop()


def test_bytes_that_are_not_a_report_are_refused_alone(setup):
    path, registry, router, address = setup
    raw = channel(address).stream_stream("/herd.v1.Router/WatchPlacement", request_serializer=None,
                                         response_deserializer=router_pb2.PlacementTable.FromString)
    sent: queue.Queue = queue.Queue()
    call = raw(iter(sent.get, None))
    try:
        first = next(call)
        refused, routes = _metric(router, "herd:placement_reports_refused_total"), router.routes
        sent.put(b"\xff\xff\xff")  # not a PlacementReport
        sent.put(_report(routes=2).SerializeToString())
        _until(lambda: router.routes == routes + 2)
        assert _metric(router, "herd:placement_reports_refused_total") == refused + 1
        _publish_alias(registry, router, 5)  # and the stream pushes the next change
        table = next(call)
        while 5 not in [w.index for w in table.workers]:
            table = next(call)
        assert table.version > first.version
    finally:
        sent.put(None)
        call.cancel()


def _until(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)
