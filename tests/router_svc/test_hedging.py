"""A worker that stops answering (real worker servers on loopback, real Redis; the stand-in for a
frozen process is a worker whose RunExperts blocks): with a replica its overdue exchange is
hedged onto it within the overdue bound and later Routes avoid it; without one the Route waits
and completes once the worker answers, with no error."""
import threading
import time

import pytest
import torch
from router_fixtures import reference_layer, router_over, worker_servers

from expert_svc.server import INLINE_ROWS
from herd.redis_server import RedisServer
from herdpb import router_pb2
from kernels import grouped_expert_ffn, route_top1
from plumbing.tensor_codec import read_tensor, write_tensor
from router_svc.placement import OVERDUE_FLOOR_S

LAYER, ROWS = 1, 32


@pytest.fixture(scope="module")
def setup(reference_models):
    path = reference_models["tiny-maverick"][1]
    redis = RedisServer(policy="noeviction")
    holds = {index: threading.Event() for index in range(3)}  # clear while the worker is "frozen"
    for hold in holds.values():
        hold.set()

    def held(index, run):
        def wrapper(request):
            holds[index].wait(60)
            return run(request)
        return wrapper

    with worker_servers(path, (list(range(0, 128, 2)), list(range(1, 128, 2)), list(range(128))), held) as records:
        gate, w13, w2 = reference_layer(path, LAYER)
        try:
            yield path, redis.url, records, holds, (gate, w13, w2)
        finally:
            for hold in holds.values():
                hold.set()
            redis.stop()


_router = router_over


def _route(router, x, timeout=20.0):
    req = router_pb2.RouteRequest(layer=LAYER)
    write_tensor(req.x, x)
    start = time.monotonic()
    resp = router.route(req, timeout=timeout)
    y = read_tensor(resp.y, dtype=torch.float32, cols=x.shape[1], max_rows=x.shape[0], exact=True)
    return y, resp, time.monotonic() - start


def _want(x, gate, w13, w2):
    ids, scaled = route_top1(x, gate)
    return ids, grouped_expert_ffn(scaled, ids, w13, w2)


def _warm(router, h, n=10):
    for s in range(n):  # recent latencies: the bound drops from its cap to its floor
        _route(router, torch.randn(ROWS, h, generator=torch.Generator().manual_seed(100 + s)))


def test_an_overdue_exchange_is_hedged_onto_a_replica_and_the_worker_taken_back_when_it_answers(setup):
    path, redis_url, records, holds, (gate, w13, w2) = setup
    router = _router(path, redis_url, records, "hedge")  # worker 2 holds every expert: a replica for both
    h = gate.shape[1]
    _warm(router, h)
    frozen = router.placement.workers[0]
    assert frozen.latency.bound() == OVERDUE_FLOOR_S
    x = torch.randn(ROWS, h, generator=torch.Generator().manual_seed(1))
    ids, want = _want(x, gate, w13, w2)
    holds[0].clear()
    try:
        y, resp, seconds = _route(router, x)
        assert torch.allclose(y, want, atol=1e-6)
        assert OVERDUE_FLOOR_S <= seconds < OVERDUE_FLOOR_S + 1.5  # detected at the bound, not after the freeze
        assert 0 not in resp.workers and router.hedges == 1 and frozen.overdue_since
        y, resp, seconds = _route(router, x)  # the next Route goes straight to the replica
        assert torch.allclose(y, want, atol=1e-6) and seconds < 0.5 and 0 not in resp.workers
        assert router.hedges == 1
    finally:
        holds[0].set()
    frozen.probe()  # the watch loop's probe: it answers again
    until = time.monotonic() + 5
    while not frozen.answering() and time.monotonic() < until:
        time.sleep(0.05)
    assert frozen.answering()
    y, resp, _ = _route(router, x)
    assert torch.allclose(y, want, atol=1e-6)
    assert [w for w, e in zip(resp.workers, ids.tolist(), strict=True) if e % 2 == 0] == [0] * int((ids % 2 == 0).sum())
    assert 0 in resp.workers  # it serves rows again; the late answer to the hedged exchange was dropped


def test_without_a_replica_an_overdue_exchange_is_awaited_and_completes_when_the_worker_answers(setup):
    path, redis_url, records, holds, (gate, w13, w2) = setup
    router = _router(path, redis_url, {0: records[0], 1: records[1]}, "alone")
    h = gate.shape[1]
    _warm(router, h)
    x = torch.randn(ROWS, h, generator=torch.Generator().manual_seed(2))
    _, want = _want(x, gate, w13, w2)
    holds[0].clear()
    thaw = threading.Timer(OVERDUE_FLOOR_S + 1.5, holds[0].set)
    thaw.start()
    try:
        y, resp, seconds = _route(router, x)
    finally:
        thaw.cancel()
        holds[0].set()
    assert torch.allclose(y, want, atol=1e-6)
    assert seconds >= OVERDUE_FLOOR_S + 1.4 and router.hedges == 0 and router.retries == 0
    assert router.placement.workers[0].answering()  # its answer took it back


def test_a_slow_exchange_of_a_worker_that_answers_its_probes_is_awaited_not_hedged(setup):
    """Slow is not stopped: while the worker answers health probes its exchange is not overdue,
    however long it takes (a big prefill), so no replica does its work twice."""
    path, redis_url, records, holds, (gate, w13, w2) = setup
    router = _router(path, redis_url, records, "slow")
    h = gate.shape[1]
    _warm(router, h)
    slow = router.placement.workers[0]
    # A big exchange: the worker computes it in a thread, and its loop answers the probes meanwhile.
    x = torch.randn(INLINE_ROWS * 4, h, generator=torch.Generator().manual_seed(3))
    _, want = _want(x, gate, w13, w2)
    stop = threading.Event()

    def probes():  # the watch loop's probes, every PROBE_EVERY_S
        while not stop.wait(0.5):
            slow.probe()

    holds[0].clear()
    threading.Thread(target=probes, daemon=True).start()
    thaw = threading.Timer(OVERDUE_FLOOR_S * 2.5, holds[0].set)
    thaw.start()
    try:
        y, resp, seconds = _route(router, x)
    finally:
        thaw.cancel()
        holds[0].set()
        stop.set()
    assert torch.allclose(y, want, atol=1e-6)
    assert seconds >= OVERDUE_FLOOR_S * 2.4 and router.hedges == 0 and 0 in resp.workers
    assert slow.answering()
