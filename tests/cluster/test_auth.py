"""Nobody gets in uninvited: API keys on the public API, the cluster token on the internal
services, Status details for operators only, and TLS on the public listener."""
import subprocess

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_svc.server import build, serve
from expert_svc.server import serve as serve_worker
from herd.client import Client
from herdpb import expert_pb2, expert_pb2_grpc, llama_pb2, llama_pb2_grpc
from plumbing.grpc_server import channel
from plumbing.tensor_codec import write_tensor

KEY, TOKEN = "k-" + "a" * 30, "t-" + "b" * 30


@pytest.fixture(scope="module")
def scout_path(reference_models):
    return str(reference_models["tiny-scout"][1])


@pytest.fixture(scope="module")
def guarded(scout_path):
    servicer, _ = build(scout_path, None, torch.float32, "cpu", {})
    server, port = serve(servicer, api_keys=[KEY], cluster_token=TOKEN)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


def tokenize(address, secret):
    stub = llama_pb2_grpc.LlamaStub(channel(address, secret=secret))
    return stub.Tokenize(llama_pb2.TokenizeRequest(text="hi"), timeout=10)


def test_the_public_api_needs_a_key(guarded):
    assert code_of(lambda: tokenize(guarded, None)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: tokenize(guarded, KEY[:-1] + "x")) == grpc.StatusCode.UNAUTHENTICATED
    stream = llama_pb2_grpc.LlamaStub(channel(guarded)).Generate(
        llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=[1, 2])), timeout=10)
    assert code_of(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
    assert list(tokenize(guarded, KEY).ids)
    got = [t for m in Client(guarded, secret=KEY).generate(ids=[1, 2, 3], max_tokens=3, ignore_eos=True)
           for t in m.token_ids]
    assert len(got) == 3
    health = health_pb2_grpc.HealthStub(channel(guarded))  # probes carry no key
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_status_shows_internals_only_to_operators(guarded, scout_path):
    assert Client(guarded, secret=KEY).status().model == "(operators only)"
    assert Client(guarded, secret=TOKEN).status().model == scout_path


def test_a_worker_refuses_calls_without_the_cluster_token(scout_path):
    server, port, _ = serve_worker(scout_path, list(range(16)), torch.float32, "cpu", token=TOKEN)
    try:
        req = expert_pb2.RunExpertsRequest(layer=0, expert_ids=[0, 1])
        write_tensor(req.x, torch.randn(2, 64))
        for secret, ok in ((None, False), (KEY, False), (TOKEN, True)):
            stub = expert_pb2_grpc.ExpertWorkerStub(channel(f"127.0.0.1:{port}", secret=secret))
            if ok:
                assert list(stub.RunExperts(req, timeout=10).y.shape) == [2, 64]
            else:
                assert code_of(lambda stub=stub: stub.RunExperts(req, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_tls_round_trip_with_a_generated_certificate(scout_path, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    servicer, _ = build(scout_path, None, torch.float32, "cpu", {})
    server, port = serve(servicer, api_keys=[KEY], tls=(cert.read_bytes(), key.read_bytes()))
    try:
        client = Client(f"localhost:{port}", secret=KEY, tls_ca=cert.read_bytes())
        assert len([t for m in client.generate(ids=[1, 2, 3], max_tokens=2, ignore_eos=True) for t in m.token_ids]) == 2
        plain = llama_pb2_grpc.LlamaStub(channel(f"localhost:{port}", secret=KEY))  # no TLS: refused
        assert code_of(lambda: plain.Tokenize(llama_pb2.TokenizeRequest(text="hi"), timeout=5)) in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        server.stop(0)
