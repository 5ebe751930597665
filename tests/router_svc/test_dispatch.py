"""The router's dispatch (real worker servers on loopback, real Redis): each worker gets one
block of rows grouped by expert, the answers land in token order, and rows of a dead replica
are rerouted to a live one with the same result."""
import socket

import pytest
import torch

from expert_svc.server import serve as serve_worker
from herd.redis_server import RedisServer
from herdpb import router_pb2
from kernels import grouped_expert_ffn, route_top1
from llama4.checkpoint import Checkpoint
from llama4.weights import load_experts, load_gates
from plumbing.registry import WorkerRegistry
from plumbing.tensor_codec import read_tensor, write_tensor
from router_svc.server import RouterServicer

LAYER, ROWS = 1, 48


class _Context:
    def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")

    def time_remaining(self):
        return 10.0


@pytest.fixture(scope="module")
def setup(reference_models):
    path = reference_models["tiny-maverick"][1]
    redis = RedisServer(policy="noeviction")
    evens, odds = list(range(0, 128, 2)), list(range(1, 128, 2))  # interleaved: sorting by worker matters
    servers, seen, records = [], {0: [], 1: []}, {}
    for index, experts in enumerate((evens, odds)):
        server, port, servicer = serve_worker(str(path), experts, torch.float32, "cpu")
        run = servicer.RunExperts

        def recording(request, context, run=run, index=index):
            seen[index].append(list(request.expert_ids))
            return run(request, context)

        servicer.RunExperts = recording
        records[index] = {"address": f"127.0.0.1:{port}", "experts": experts, "fingerprint": servicer.fingerprint}
        servers.append(server)
    ckpt = Checkpoint(path)
    w13, w2 = load_experts(ckpt, list(range(128)), torch.float32, "cpu")[LAYER]
    gate = load_gates(ckpt, torch.float32, "cpu")[LAYER]
    try:
        yield path, redis.url, records, seen, (gate, w13, w2)
    finally:
        for server in servers:
            server.stop(0)
        redis.stop()


def _router(path, redis_url, records, cluster):
    registry = WorkerRegistry(redis_url, cluster)
    for index, record in records.items():
        registry.publish(index, record)
    router = RouterServicer(Checkpoint(path), torch.float32, registry)
    router.placement.refresh()
    return router


def _route(router, x):
    req = router_pb2.RouteRequest(layer=LAYER)
    write_tensor(req.x, x)
    resp = router.Route(req, _Context(), timeout=10.0)
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
