"""The real cluster on loopback: Redis, a local Ray cluster, expert workers, router, attention.

One cluster for the module (tiny Maverick-shaped model, 128 experts over 4 workers); the
monolithic model on the same checkpoint is the reference.
"""
import concurrent.futures
import os
import signal
import subprocess
import time

import grpc
import pytest
import torch

from herd.client import Client
from herdpb import expert_pb2, expert_pb2_grpc, llama_pb2, router_pb2, router_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.sampling import SamplingParams
from llama4.store import resolve_model
from plumbing.grpc_server import channel
from plumbing.tensor_codec import write_tensor

MODEL = "tiny-maverick"  # as the local_cluster fixture (tests/conftest.py)

LOOPBACK = {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}


@pytest.fixture(scope="module")
def cluster(local_cluster):
    with local_cluster(workers=4, route_timeout_s=90.0) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return Client(cluster.attention_address)


def prompts(n=8, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200000, (int(l),), generator=gen).tolist()
            for l in torch.randint(4, 60, (n,), generator=gen)]


def remote_tokens(client, ids, max_tokens, **kw):
    out = []
    for msg in client.generate(ids=ids, max_tokens=max_tokens, ignore_eos=True, **kw):
        out.extend(msg.token_ids)
    return out


def test_scores_equal_monolithic(client, mono):
    ids = prompts(1)[0] + prompts(1, seed=9)[0]
    resp = client.score(ids=ids)
    (seq,) = Engine(mono).run([Request(ids, SamplingParams(max_tokens=0), prompt_logprobs=True)])
    assert list(resp.ids) == ids
    assert torch.allclose(torch.tensor(list(resp.logprobs)), torch.tensor(seq.prompt_logprobs[1:]), atol=1e-5)


def test_concurrent_requests_are_batched_and_token_identical(client, mono):
    ps = prompts(8)
    expected = [s.output_ids
                for s in Engine(mono).run([Request(p, SamplingParams(max_tokens=24, ignore_eos=True)) for p in ps])]
    before = client.status()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: remote_tokens(client, p, 24), ps))
    assert got == expected
    after = client.status()
    sizes = list(after.recent_batch_sizes)[len(before.recent_batch_sizes):]
    full = [s for s in sizes if s >= 2]
    assert sum(full) / len(full) >= 6, sizes
    # One Route RPC per MoE layer per step; at most one RunExperts per worker per Route.
    steps = after.steps - before.steps
    assert after.route_rpcs - before.route_rpcs == steps * 2
    assert after.router.worker_rpcs - before.router.worker_rpcs <= (after.router.routes - before.router.routes) * 4


def test_killed_worker_is_survived_and_restarted(cluster, client, mono):
    p = prompts(1, seed=11)[0]
    (expected,) = [s.output_ids for s in Engine(mono).run([Request(p, SamplingParams(max_tokens=64, ignore_eos=True))])]
    pids = cluster.worker_pids()
    stream = client.generate(ids=p, max_tokens=64, ignore_eos=True)
    got = []
    for msg in stream:
        got.extend(msg.token_ids)
        if len(got) == 10:
            os.kill(pids[1], signal.SIGKILL)
    assert got == expected
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            new = cluster.worker_pids()
            if new[1] != pids[1]:
                break
        except Exception:
            pass
        time.sleep(0.5)
    assert cluster.worker_pids()[1] != pids[1]
    assert remote_tokens(client, p, 16) == expected[:16]
    assert client.status().router.retries >= 1


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_malformed_internal_requests_are_refused(cluster, client):
    ckpt_cfg = Checkpoint(resolve_model(MODEL)).config
    h = ckpt_cfg.hidden_size
    router = router_pb2_grpc.RouterStub(channel(cluster.router_address, secret=cluster.cluster_token))
    good = torch.randn(3, h)

    def route(x=None, layer=1, mutate=None):
        req = router_pb2.RouteRequest(layer=layer)
        write_tensor(req.x, good if x is None else x)
        if mutate:
            mutate(req)
        return router.Route(req, timeout=30)

    assert _code(lambda: route(x=good.double().float().half()))[0] == grpc.StatusCode.INVALID_ARGUMENT  # dtype
    code, msg = _code(lambda: route(mutate=lambda r: r.x.shape.__setitem__(0, 4)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in msg
    assert _code(lambda: route(x=torch.randn(3, h + 1)))[0] == grpc.StatusCode.INVALID_ARGUMENT  # shape
    assert "layer=0" in _code(lambda: route(layer=0))[1]  # a dense layer
    bad = good.clone()
    bad[1, 2] = float("nan")
    assert "NaN" in _code(lambda: route(x=bad))[1]
    worker_addr = next(w.address for w in router.Status(router_pb2.RouterStatusRequest(), timeout=10).workers
                       if w.index == 0)
    worker = expert_pb2_grpc.ExpertWorkerStub(channel(worker_addr, secret=cluster.cluster_token))
    req = expert_pb2.RunExpertsRequest(layer=1, expert_ids=[0, 1, 127])
    write_tensor(req.x, good)
    code, msg = _code(lambda: worker.RunExperts(req, timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "127" in msg  # not its expert: not the rows' fault
    req = expert_pb2.RunExpertsRequest(layer=1, expert_ids=[0, 1, 9999])
    write_tensor(req.x, good)
    assert _code(lambda: worker.RunExperts(req, timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT
    huge = router_pb2.RouteRequest(layer=1)
    huge.x.dtype, huge.x.data = "float32", b"\0" * (70 * 1024 * 1024)
    huge.x.shape[:] = [70 * 1024 * 1024 // (4 * h), h]
    assert _code(lambda: router.Route(huge, timeout=30))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert route().y.shape == [3, h]  # still serving


@pytest.mark.parametrize("build,needle", [
    (lambda r: setattr(r, "text", ""), "text is empty"),
    (lambda r: r.ids.ids.extend([1, 202048]), "202048"),
    (lambda r: (r.ids.ids.extend([1, 2]), setattr(r.sampling, "max_tokens", 10**6)), "context limit"),
    (lambda r: (r.ids.ids.extend([1, 2]), setattr(r.sampling, "temperature", float("nan"))), "temperature"),
    (lambda r: (r.ids.ids.extend([1, 2]), setattr(r.sampling, "top_p", 1.5)), "top_p"),
    (lambda r: None, "prompt is missing"),
    (lambda r: (r.ids.ids.extend([1, 2]), setattr(r, "session_id", "s" * 300)), "session_id"),
])
def test_malformed_public_requests_are_refused(client, build, needle):
    req = llama_pb2.GenerateRequest()
    build(req)
    code, msg = _code(lambda: list(client.stub.Generate(req, timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg
    assert len(remote_tokens(client, [1, 2, 3], 3)) == 3  # everyone else is still served


def test_nothing_listens_beyond_loopback(cluster):
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = {str(p.pid) for p in cluster.procs.values()} | {str(pid) for pid in cluster.worker_pids()}
    ours |= {str(cluster.redis.proc.pid), str(cluster.state_redis.proc.pid)}
    ours.add(str(os.getpid()))
    import psutil

    for proc in psutil.Process().children(recursive=True):
        ours.add(str(proc.pid))
    checked = 0
    for line in out.splitlines():
        cols = line.split()
        local = cols[3]
        pids = {part.split(",")[0] for part in line.split("pid=")[1:]}
        if pids & ours:
            checked += 1
            assert local.rsplit(":", 1)[0] in LOOPBACK, line
    assert checked >= 7  # redis, ray's own listeners, 4 workers, router, attention


def test_cli_score_and_status_through_the_cluster(cluster, herd_home):
    import json
    import sys

    env = {**os.environ, "HERD_HOME": str(herd_home)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "herd", *a], capture_output=True, text=True, env=env,
                                    timeout=300)
    ids = "200000,954,72394,101284,264,26,1000,2000"
    remote = run("score", "--target", cluster.attention_address, "--ids", ids, "--json")
    local = run("score", "--model", MODEL, "--ids", ids, "--json")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    r, l = json.loads(remote.stdout), json.loads(local.stdout)
    assert r["ids"] == l["ids"] and r["logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(r["logprobs"][1:], l["logprobs"][1:], strict=True)) <= 1e-5
    st = run("status", "--target", cluster.attention_address)
    assert st.returncode == 0 and "worker 3" in st.stdout and "experts [96" in st.stdout
    bad = run("score", "--target", cluster.attention_address, "--ids", "1,999999")
    assert bad.returncode == 2 and "999999" in bad.stderr


def test_cancel_and_deadline_free_the_sequence(client):
    req = llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=[1, 2, 3, 4]))
    req.sampling.max_tokens, req.sampling.ignore_eos = 3000, True  # minutes of work unless aborted
    call = client.stub.Generate(req, timeout=120)
    for i, _ in enumerate(call):
        if i == 2:
            call.cancel()
            break
    expired = client.stub.Generate(req, timeout=0.5)
    with pytest.raises(grpc.RpcError) as err:
        list(expired)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (client.status().running or client.status().waiting):
        time.sleep(0.2)
    status = client.status()
    assert status.running == 0 and status.waiting == 0  # neither request still holds the engine


def test_router_health_follows_its_workers(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel(cluster.router_address))
    check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert check() == health_pb2.HealthCheckResponse.SERVING
    pids = cluster.worker_pids()
    os.kill(pids[2], signal.SIGKILL)  # experts 64-95 have no other holder
    seen, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        seen.append(check())
        if health_pb2.HealthCheckResponse.NOT_SERVING in seen and seen[-1] == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.05)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen  # while the worker was down
    assert seen[-1] == health_pb2.HealthCheckResponse.SERVING  # and back once Ray restarted it


def test_tokenize_matches_the_checkpoint_tokenizer(client):
    from llama4.tokenizer import Tokenizer

    tok = Tokenizer.for_checkpoint(resolve_model(MODEL))
    got = client.stub.Tokenize(llama_pb2.TokenizeRequest(text="Llamas hum."), timeout=10)
    assert list(got.ids) == tok.encode("Llamas hum.", add_bos=True)
    chat = llama_pb2.TokenizeRequest(
        chat=llama_pb2.ChatMessages(messages=[llama_pb2.ChatMessage(role="user", content="Hi")]))
    assert list(client.stub.Tokenize(chat, timeout=10).ids) == tok.apply_chat([{"role": "user", "content": "Hi"}])


def test_route_trace_names_the_expert_and_worker_of_every_token(client, mono):
    p = prompts(1, seed=21)[0]
    (seq,) = Engine(mono).run([Request(p, SamplingParams(max_tokens=6, ignore_eos=True), trace_routes=True)])
    expected_experts = []
    engine = Engine(mono)
    engine.add(Request(p, SamplingParams(max_tokens=6, ignore_eos=True), trace_routes=True))
    while engine.has_work:
        expected_experts += [[e for _, e, _ in ev.route] for ev in engine.step() if ev.token is not None]
    got = [msg for msg in client.generate(ids=p, max_tokens=6, ignore_eos=True, trace_routes=True) if msg.token_ids]
    assert [list(m.token_ids)[0] for m in got] == seq.output_ids
    assert [[h.expert for h in m.route] for m in got] == expected_experts
    for m in got:
        assert [h.layer for h in m.route] == [1, 3]
        assert all(h.worker == h.expert // 32 for h in m.route)  # contiguous placement: 32 experts per worker
