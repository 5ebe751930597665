"""Faults around a running cluster: a killed router, Redis killed and restarted empty, health
under many streams and with the router stopped, and herd up stopped with SIGTERM mid-request."""
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herd.client import Client
from herd.redis_server import free_port
from llama4.engine import Engine, Request
from llama4.sampling import SamplingParams
from plumbing.grpc_server import channel
from plumbing.registry import WorkerRegistry

MODEL = "tiny-maverick"  # as the local_cluster fixture (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def cluster(local_cluster):
    with local_cluster(workers=2, drain_timeout_s=10.0) as c:
        yield c


def prompt(seed, n=20):
    return torch.randint(3, 200000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def expected(mono, ids, n):
    return Engine(mono).run([Request(ids, SamplingParams(max_tokens=n, ignore_eos=True))])[0].output_ids


def tokens(cluster, ids, n, timeout=60.0):
    client = Client(cluster.attention_address, timeout=timeout)
    return [t for m in client.generate(ids=ids, max_tokens=n, ignore_eos=True) for t in m.token_ids]


def supervise_until(cluster, done, timeout):
    deadline, said = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        said += cluster.supervise()
        if done():
            return said
        time.sleep(0.2)
    raise AssertionError(f"not recovered within {timeout} s; supervisor said {said}")


def serves(cluster, ids, want):
    try:
        return tokens(cluster, ids, len(want), timeout=10) == want
    except RuntimeError:
        return False


def background_load(cluster, stop):
    """Requests running all the time; some may fail while a process is down."""
    def loop():
        while not stop.is_set():
            try:
                tokens(cluster, prompt(5), 8, timeout=20)
            except RuntimeError:
                time.sleep(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_killed_router_is_restarted_and_the_cluster_serves_within_30s(cluster, mono):
    ids = prompt(1)
    want = expected(mono, ids, 10)
    stop = threading.Event()
    background_load(cluster, stop)
    try:
        old = cluster.procs["router"].pid
        os.kill(old, signal.SIGKILL)
        start = time.monotonic()
        said = supervise_until(cluster, lambda: cluster.procs["router"].pid != old and serves(cluster, ids, want), 30)
        assert time.monotonic() - start < 30
        assert any("router exited" in line and "restarted" in line for line in said), said
    finally:
        stop.set()


def test_redis_killed_and_restarted_empty_keeps_every_worker(cluster, mono):
    ids = prompt(2)
    want = expected(mono, ids, 10)
    workers_before = cluster.worker_pids()
    stop = threading.Event()
    background_load(cluster, stop)
    try:
        os.kill(cluster.state_redis.proc.pid, signal.SIGKILL)
        os.kill(cluster.redis.proc.pid, signal.SIGKILL)
        start = time.monotonic()
        def recovered():
            try:
                return serves(cluster, ids, want) and len(WorkerRegistry(cluster.state_redis.url).workers()) == 2
            except redis.RedisError:  # still down
                return False

        supervise_until(cluster, recovered, 10)
        assert time.monotonic() - start < 10
    finally:
        stop.set()
    assert cluster.worker_pids() == workers_before  # no worker was restarted
    status = Client(cluster.attention_address).status()
    assert sorted(w.index for w in status.router.workers if w.healthy) == [0, 1]


def test_health_answers_under_64_streams_and_tells_the_truth_about_the_router(cluster):
    health = health_pb2_grpc.HealthStub(channel(cluster.attention_address))
    check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    client = Client(cluster.attention_address)
    calls = [client.stub.Generate(_long(prompt(100 + i)), timeout=300) for i in range(64)]
    try:
        for call in calls[:8]:
            next(call)  # the streams are open and producing
        start = time.monotonic()
        assert check() == SERVING
        assert time.monotonic() - start < 1.0
        router = psutil.Process(cluster.procs["router"].pid)
        router.suspend()  # the router stops answering
        try:
            start, status = time.monotonic(), SERVING
            while status == SERVING and time.monotonic() - start < 10:
                status = check()
                time.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() - start < 5
            live = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status
            assert live == SERVING  # alive, only not ready
        finally:
            router.resume()
        deadline = time.monotonic() + 10
        while check() != SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert check() == SERVING
    finally:
        for call in calls:
            call.cancel()


def _long(ids):
    from herdpb import llama_pb2

    req = llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.ignore_eos = 400, True
    return req


def test_sigterm_drains_the_request_stops_everything_and_exits_0(herd_home, tmp_path, mono):
    port = free_port()
    config = tmp_path / "deploy.yaml"
    config.write_text(f"model: {MODEL}\nworkers: 2\nattention_port: {port}\nhttp_port: 0\ndashboard: false\n")
    proc = subprocess.Popen([sys.executable, "-m", "herd", "up", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout:
        if line.startswith("herd is up"):
            break
    family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}
    ids = prompt(3)
    want = expected(mono, ids, 48)
    got = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def stream():
            for msg in Client(f"127.0.0.1:{port}").generate(ids=ids, max_tokens=48, ignore_eos=True):
                got.extend(msg.token_ids)
                if len(got) == 4:
                    proc.send_signal(signal.SIGTERM)  # mid-request

        pool.submit(stream).result(timeout=120)
    out, err = proc.communicate(timeout=120)
    assert got == want  # the request in flight finished
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "Stack trace" not in err and "SIGTERM received" not in err, err[-2000:]
    time.sleep(1)
    left = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, [psutil.Process(p).cmdline() for p in left]
    with pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{port}")).Check(health_pb2.HealthCheckRequest(), timeout=2)
