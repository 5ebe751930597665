"""The router's dispatch (real worker servers on loopback, real Redis): each worker gets one
block of rows grouped by expert, the answers land in token order, rows of a dead replica
are rerouted to a live one with the same result, and a failed request on a shared stream
fails alone."""
import socket

import grpc
import pytest
import torch
from router_fixtures import reference_layer, router_over, worker_servers

from herd.redis_server import RedisServer
from herdpb import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from kernels import grouped_expert_ffn, route_top1
from plumbing.duplex import Duplex, failure_of, serve_each
from plumbing.grpc_server import channel
from plumbing.tensor_codec import read_tensor, write_tensor
from router_svc.server import start as start_router

LAYER, ROWS = 1, 48


@pytest.fixture(scope="module")
def setup(reference_models):
    path = reference_models["tiny-maverick"][1]
    redis = RedisServer(policy="noeviction")
    evens, odds = list(range(0, 128, 2)), list(range(1, 128, 2))  # interleaved: sorting by worker matters
    seen = {0: [], 1: []}

    def recording(index, run):
        def wrapper(request):
            seen[index].append(list(request.expert_ids))
            return run(request)
        return wrapper

    with worker_servers(path, (evens, odds), recording) as records:
        gate, w13, w2 = reference_layer(path, LAYER)
        try:
            yield path, redis.url, records, seen, (gate, w13, w2)
        finally:
            redis.stop()


_router = router_over


def _route(router, x):
    req = router_pb2.RouteRequest(layer=LAYER)
    write_tensor(req.x, x)
    resp = router.route(req, timeout=10.0)
    return read_tensor(resp.y, dtype=torch.float32, cols=x.shape[1], max_rows=x.shape[0], exact=True), resp


def _local(x, gate, w13, w2):
    ids, scaled = route_top1(x, gate)
    return ids, grouped_expert_ffn(scaled, ids, w13, w2)


def test_each_worker_gets_one_block_grouped_by_expert_and_answers_land_in_token_order(setup):
    path, redis_url, records, seen, (gate, w13, w2) = setup
    router = _router(path, redis_url, records, "two")
    for rows in (1, ROWS):
        seen[0].clear(), seen[1].clear()
        x = torch.randn(rows, gate.shape[1], generator=torch.Generator().manual_seed(rows))
        y, resp = _route(router, x)
        ids, want = _local(x, gate, w13, w2)
        assert torch.allclose(y, want, atol=1e-6)
        assert list(resp.expert_ids) == ids.tolist() and list(resp.workers) == (ids % 2).tolist()
        for index in (0, 1):
            assert len(seen[index]) <= 1  # at most one message per worker
            for sent in seen[index]:
                assert sent == sorted(sent) and all(e % 2 == index for e in sent)
        assert sum(len(s) for calls in seen.values() for s in calls) == rows


def test_rows_of_a_dead_replica_are_rerouted_with_the_same_answer(setup):
    path, redis_url, records, seen, (gate, w13, w2) = setup
    with socket.socket() as s:  # a port nothing listens on: calls to it fail UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Worker 2 holds every expert too, and is the first choice for the odd ones (replica e % 2).
    dead = {"address": f"127.0.0.1:{port}", "experts": list(range(128)), "fingerprint": records[0]["fingerprint"]}
    router = _router(path, redis_url, {**records, 2: dead}, "dead")
    x = torch.randn(ROWS, gate.shape[1], generator=torch.Generator().manual_seed(7))
    y, resp = _route(router, x)
    ids, want = _local(x, gate, w13, w2)
    assert torch.allclose(y, want, atol=1e-6)
    assert list(resp.workers) == (ids % 2).tolist()  # never the dead one
    assert router.retries == 1 and not router.placement.workers[2].healthy


def _expert_request(x, experts):
    req = expert_pb2.RunExpertsRequest(layer=LAYER, expert_ids=experts)
    write_tensor(req.x, x)
    return req


def test_a_failed_request_on_a_shared_worker_stream_fails_alone(setup):
    """The router's one stream to a worker carries every concurrent Route: an overflowing or
    malformed request pipelined between good ones fails its own exchange, and the good ones,
    before and after it on the same open stream, get their own answers."""
    path, redis_url, records, seen, (gate, w13, w2) = setup
    stream = Duplex(expert_pb2_grpc.ExpertWorkerStub(channel(records[0]["address"])).RunExpertsStream)
    h = gate.shape[1]
    good = [torch.randn(3, h, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    experts = [0, 2, 2]
    want = [grouped_expert_ffn(x, torch.tensor(experts), w13, w2) for x in good]
    try:
        first = stream.send_all([_expert_request(good[0], experts)])
        overflow = stream.send_all([_expert_request(torch.full((3, h), 1e30), experts)])
        second = stream.send_all([_expert_request(good[1], experts)])
        # A multi-message exchange whose middle message names an expert this worker lacks.
        mixed = stream.send_all([_expert_request(good[0], experts), _expert_request(good[1], [1, 1, 1]),
                                 _expert_request(good[2], experts)])
        third = stream.send_all([_expert_request(good[2], experts)])
        opened = stream._call
        for ex, x in ((first, 0), (second, 1), (third, 2)):
            y = read_tensor(ex.result(10)[0].y, dtype=torch.float32, cols=h, max_rows=3, exact=True)
            assert torch.allclose(y, want[x], atol=1e-6)
        for ex, code, why in ((overflow, grpc.StatusCode.INVALID_ARGUMENT, "overflowed"),
                              (mixed, grpc.StatusCode.FAILED_PRECONDITION, "expert 1 is not held")):
            with pytest.raises(grpc.RpcError) as err:
                ex.result(10)
            assert err.value.code() == code and why in err.value.details()
        assert stream._call is opened and opened.broken is None  # the stream never broke
    finally:
        stream.close()


def test_a_timed_out_exchange_keeps_the_shared_stream_for_the_others(setup):
    """A caller whose deadline passes first (the router takes each caller's deadline) fails
    alone: its late answer pairs with no later exchange, and the stream stays open."""
    path, redis_url, records, seen, (gate, w13, w2) = setup
    stream = Duplex(expert_pb2_grpc.ExpertWorkerStub(channel(records[0]["address"])).RunExpertsStream)
    h = gate.shape[1]
    slow = torch.randn(2048, h, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, h, generator=torch.Generator().manual_seed(6))
    want = grouped_expert_ffn(x, torch.tensor([0, 2, 4]), w13, w2)
    try:
        hurried = stream.send_all([_expert_request(slow, [0] * 2048)])
        patient = stream.send_all([_expert_request(x, [0, 2, 4])])
        opened = stream._call
        with pytest.raises(grpc.RpcError) as err:
            hurried.result(0.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        y = read_tensor(patient.result(10)[0].y, dtype=torch.float32, cols=h, max_rows=3, exact=True)
        assert torch.allclose(y, want, atol=1e-6)
        later = stream.send_all([_expert_request(x, [0, 2, 4])])
        assert torch.allclose(read_tensor(later.result(10)[0].y, dtype=torch.float32, cols=h, max_rows=3), want,
                              atol=1e-6)
        assert stream._call is opened and opened.broken is None
    finally:
        stream.close()


def test_a_failed_route_on_the_shared_router_stream_fails_alone(setup):
    path, redis_url, records, seen, (gate, w13, w2) = setup
    router = _router(path, redis_url, records, "stream")
    server, port, _ = start_router(router)
    stream = Duplex(router_pb2_grpc.RouterStub(channel(f"127.0.0.1:{port}")).RouteStream)
    x = torch.randn(5, gate.shape[1], generator=torch.Generator().manual_seed(11))
    _, want = _local(x, gate, w13, w2)

    def route(x, layer=LAYER):
        req = router_pb2.RouteRequest(layer=layer)
        write_tensor(req.x, x)
        return req

    try:
        exchanges = [stream.send_all([route(x)]), stream.send_all([route(torch.full_like(x, 1e30))]),
                     stream.send_all([route(x, layer=0)]), stream.send_all([route(x)])]
        for ex in (exchanges[0], exchanges[3]):
            y = read_tensor(ex.result(10)[0].y, dtype=torch.float32, cols=x.shape[1], max_rows=5, exact=True)
            assert torch.allclose(y, want, atol=1e-6)
        for ex, why in ((exchanges[1], "overflowed"), (exchanges[2], "not a MoE layer")):
            with pytest.raises(grpc.RpcError) as err:
                ex.result(10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details()
    finally:
        stream.close()
        server.stop(0)


def test_an_unexpected_error_answers_internal_and_the_stream_goes_on():
    def run(request):
        if request.layer == 1:
            raise KeyError("boom")
        return expert_pb2.RunExpertsResponse()

    requests = [expert_pb2.RunExpertsRequest(layer=n, exchange_id=10 + n) for n in range(3)]
    answers = list(serve_each(iter(requests), run, expert_pb2.RunExpertsResponse))
    assert [failure_of(a) is None for a in answers] == [True, False, True]
    assert [a.exchange_id for a in answers] == [10, 11, 12]  # every answer, failed or not, echoes its id
    assert failure_of(answers[1]).code() == grpc.StatusCode.INTERNAL and "KeyError" in failure_of(answers[1]).details()
