"""The router's coalescing (real worker servers and a real router server on loopback, real Redis):
Route exchanges for the same layer that are at the router at the same moment, from different
streams, reach each worker as one RunExperts exchange and each gets its own rows back; a member
whose rows are refused fails alone; without coalescing each goes on its own."""
import time

import grpc
import pytest
import torch
from prometheus_client import generate_latest
from router_fixtures import reference_layer, router_over, worker_servers

from herd.redis_server import RedisServer
from herdpb import router_pb2, router_pb2_grpc
from kernels import grouped_expert_ffn, route_top1
from plumbing.duplex import Duplex
from plumbing.grpc_server import channel
from plumbing.tensor_codec import read_tensor, write_tensor
from router_svc.server import start as start_router

LAYER = 1


@pytest.fixture(scope="module")
def setup(reference_models):
    path = reference_models["tiny-maverick"][1]
    redis = RedisServer(policy="noeviction")
    seen = {0: [], 1: []}  # rows of each RunExperts exchange, per worker

    def recording(index, run):
        def wrapper(request):
            seen[index].append(len(request.expert_ids))
            return run(request)
        return wrapper

    with worker_servers(path, (list(range(0, 128, 2)), list(range(1, 128, 2))), recording) as records:
        gate, w13, w2 = reference_layer(path, LAYER)
        try:
            yield path, redis.url, records, seen, (gate, w13, w2)
        finally:
            redis.stop()


def _cluster(path, redis_url, records, name, coalesce=True):
    router = router_over(path, redis_url, records, name, coalesce=coalesce)
    server, port, _ = start_router(router)
    streams = [Duplex(router_pb2_grpc.RouterStub(channel(f"127.0.0.1:{port}")).RouteStream) for _ in range(3)]
    return router, server, streams


def _request(x, layer=LAYER):
    req = router_pb2.RouteRequest(layer=layer)
    write_tensor(req.x, x)
    return req


def _at_once(router, streams, xs, layers=None):
    """Send one exchange on each stream while the router's loop is busy, so that all of them are
    at the router when it next reads: the same moment, as under load."""
    router.loop.loop.call_soon_threadsafe(time.sleep, 0.5)
    time.sleep(0.05)
    layers = layers or [LAYER] * len(xs)
    return [stream.send_all([_request(x, layer)]) for stream, x, layer in zip(streams, xs, layers, strict=False)]


def _want(x, gate, w13, w2):
    ids, scaled = route_top1(x, gate)
    return grouped_expert_ffn(scaled, ids, w13, w2)


def _y(exchange, rows, cols):
    return read_tensor(exchange.result(20)[0].y, dtype=torch.float32, cols=cols, max_rows=rows, exact=True)


def _warm(streams, h):
    for stream in streams:  # every stream open, so none is opened during the measured moment
        stream.send_all([_request(torch.randn(1, h))]).result(20)


def test_exchanges_at_the_router_at_once_reach_each_worker_as_one(setup):
    path, redis_url, records, seen, (gate, w13, w2) = setup
    router, server, streams = _cluster(path, redis_url, records, "coalesce")
    h = gate.shape[1]
    try:
        _warm(streams, h)
        xs = [torch.randn(rows, h, generator=torch.Generator().manual_seed(rows)) for rows in (5, 9)]
        seen[0].clear(), seen[1].clear()
        routes, rpcs = router.routes, router.worker_rpcs
        exchanges = _at_once(router, streams, xs)
        for ex, x in zip(exchanges, xs, strict=True):
            assert torch.allclose(_y(ex, x.shape[0], h), _want(x, gate, w13, w2), atol=1e-6)
        assert router.routes - routes == 2
        # One RunExperts per worker for both Routes, carrying both Routes' rows.
        assert router.worker_rpcs - rpcs == len(seen[0]) + len(seen[1]) <= 2
        assert sum(seen[0]) + sum(seen[1]) == 14 and len(seen[0]) <= 1 and len(seen[1]) <= 1
        assert router.coalescer.coalesced >= 2
        scraped = generate_latest(router.metrics.registry).decode()
        assert f"herd:coalesced_route_requests_total {float(router.coalescer.coalesced)}" in scraped
        assert f"herd:route_dispatches_total {float(router.coalescer.batches)}" in scraped
    finally:
        for stream in streams:
            stream.close()
        server.stop(0)


def test_a_refused_member_of_a_coalesced_exchange_fails_alone(setup):
    """Rows whose expert output overflows (INVALID_ARGUMENT) and a request for a layer that is not a
    MoE layer arrive with a good exchange: each bad one fails with its own error, the good one
    gets its rows, and every stream stays open."""
    path, redis_url, records, seen, (gate, w13, w2) = setup
    router, server, streams = _cluster(path, redis_url, records, "refused")
    h = gate.shape[1]
    try:
        _warm(streams, h)
        good = torch.randn(6, h, generator=torch.Generator().manual_seed(1))
        opened = [stream._call for stream in streams]
        exchanges = _at_once(router, streams, [torch.full((4, h), 1e30), good, good], [LAYER, LAYER, 0])
        assert torch.allclose(_y(exchanges[1], 6, h), _want(good, gate, w13, w2), atol=1e-6)
        for ex, why in ((exchanges[0], "overflowed"), (exchanges[2], "not a MoE layer")):
            with pytest.raises(grpc.RpcError) as err:
                ex.result(20)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details()
        assert router.coalescer.coalesced >= 2  # the overflowing rows and the good ones did meet
        later = streams[0].send_all([_request(good)])
        assert torch.allclose(_y(later, 6, h), _want(good, gate, w13, w2), atol=1e-6)
        assert [stream._call for stream in streams] == opened and all(c.broken is None for c in opened)
    finally:
        for stream in streams:
            stream.close()
        server.stop(0)


def test_without_coalescing_each_exchange_goes_on_its_own(setup):
    path, redis_url, records, seen, (gate, w13, w2) = setup
    router, server, streams = _cluster(path, redis_url, records, "alone", coalesce=False)
    h = gate.shape[1]
    try:
        _warm(streams, h)
        xs = [torch.randn(8, h, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
        rpcs = router.worker_rpcs
        exchanges = _at_once(router, streams, xs)
        for ex, x in zip(exchanges, xs, strict=True):
            assert torch.allclose(_y(ex, 8, h), _want(x, gate, w13, w2), atol=1e-6)
        assert router.worker_rpcs - rpcs >= 3 and router.coalescer.coalesced == 0
    finally:
        for stream in streams:
            stream.close()
        server.stop(0)
