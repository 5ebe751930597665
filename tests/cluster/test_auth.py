"""Nobody gets in uninvited, and each credential opens only its own doors: API keys the public
API (gRPC and HTTP), the cluster token the internal services and what operators read (Status
with internal addresses, /metrics); health and reflection stay open. Every door is tried with
no secret, a wrong one, the other kind and the right one, on a real cluster with auth on
loopback (Redis, an expert worker, the router, the attention service); and TLS on the public
listener."""
import stat
import subprocess
import time
from types import SimpleNamespace

import grpc
import openai
import pytest
import requests
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_svc.http_api import create_app, serve_http
from attention_svc.server import build, serve
from expert_svc.server import serve as serve_worker
from herd import cli
from herd.client import Client
from herd.redis_server import RedisServer
from herdpb import expert_pb2, expert_pb2_grpc, llama_pb2, llama_pb2_grpc, router_pb2, router_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.store import write_random_checkpoint
from plumbing.auth import API_KEY_FILE, CLUSTER_TOKEN_ENV, CLUSTER_TOKEN_FILE
from plumbing.grpc_server import channel, wait_serving
from plumbing.registry import WorkerRegistry
from plumbing.tensor_codec import write_tensor
from router_svc.server import serve as serve_router

KEY, TOKEN = "k-" + "a" * 30, "t-" + "b" * 30
MODEL = "scout"
CREDENTIALS = {"no secret": None, "a wrong secret": "k-" + "c" * 30, "an API key": KEY, "the cluster token": TOKEN}
API_KEY, CLUSTER_TOKEN, ANYONE = {"an API key"}, {"the cluster token"}, set(CREDENTIALS)
# Who opens what: the table the README states.
ATTENTION_DOORS = {"Generate": API_KEY, "Score": API_KEY, "Tokenize": API_KEY, "Status": API_KEY | CLUSTER_TOKEN}
INTERNAL_DOORS = {("router", "Route"): CLUSTER_TOKEN, ("router", "RouteStream"): CLUSTER_TOKEN,
                  ("router", "Status"): CLUSTER_TOKEN, ("router", "WatchPlacement"): CLUSTER_TOKEN,
                  ("worker", "RunExperts"): CLUSTER_TOKEN, ("worker", "RunExpertsStream"): CLUSTER_TOKEN}
HTTP_DOORS = {("GET", "/v1/models"): API_KEY, ("POST", "/v1/completions"): API_KEY,
              ("POST", "/v1/chat/completions"): API_KEY, ("GET", "/metrics"): API_KEY | CLUSTER_TOKEN,
              ("GET", "/health"): ANYONE}


@pytest.fixture(scope="module")
def scout_path(tmp_path_factory):
    return str(write_random_checkpoint("tiny-scout", tmp_path_factory.mktemp("scout")))  # Llama 4's vocabulary


@pytest.fixture(scope="module")
def cluster(scout_path):
    """Redis, one worker holding every expert, the router and the attention service, all with auth."""
    cfg = Checkpoint(scout_path).config
    redis = RedisServer()
    worker, worker_port, worker_sv = serve_worker(scout_path, list(range(cfg.num_local_experts)), torch.float32,
                                                  "cpu", token=TOKEN)
    worker_address = f"127.0.0.1:{worker_port}"
    WorkerRegistry(redis.url, "auth").publish(0, {"address": worker_address, "experts": list(range(
        cfg.num_local_experts)), "fingerprint": worker_sv.fingerprint})
    router, router_port, _ = serve_router(scout_path, torch.float32, redis.url, "auth", token=TOKEN)
    router_address = f"127.0.0.1:{router_port}"
    wait_serving(router_address, 60)
    servicer, _ = build(scout_path, router_address, torch.float32, "cpu", {}, cluster_token=TOKEN)
    server, port = serve(servicer, api_keys=[KEY], cluster_token=TOKEN)
    http, http_port = serve_http(create_app(servicer, MODEL, [KEY], TOKEN, servicer.loop.metrics), "127.0.0.1", 0)
    c = SimpleNamespace(attention=f"127.0.0.1:{port}", http=f"http://127.0.0.1:{http_port}", router=router_address,
                        worker=worker_address, hidden=cfg.hidden_size, model_path=scout_path)
    for _ in range(100):
        try:
            requests.get(c.http + "/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield c
    http.should_exit = True
    for s in (server, router, worker):
        s.stop(0)
    redis.stop()


def refusal(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def llama_call(c, method: str, secret: str | None):
    stub = llama_pb2_grpc.LlamaStub(channel(c.attention, secret=secret))
    ids = llama_pb2.TokenIds(ids=[1, 2, 3])
    if method == "Generate":
        return [t for m in stub.Generate(llama_pb2.GenerateRequest(
            ids=ids, sampling=llama_pb2.SamplingParams(max_tokens=2, ignore_eos=True)), timeout=60)
            for t in m.token_ids]
    if method == "Score":
        return list(stub.Score(llama_pb2.ScoreRequest(ids=ids), timeout=60).logprobs)
    if method == "Tokenize":
        return list(stub.Tokenize(llama_pb2.TokenizeRequest(text="hi"), timeout=10).ids)
    return stub.Status(llama_pb2.StatusRequest(), timeout=10)


@pytest.mark.parametrize("method", sorted(ATTENTION_DOORS))
@pytest.mark.parametrize("who", sorted(CREDENTIALS))
def test_each_public_method_opens_only_to_its_credentials(cluster, method, who):
    secret = CREDENTIALS[who]
    if who not in ATTENTION_DOORS[method]:
        err = refusal(lambda: llama_call(cluster, method, secret))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.details()
        assert not secret or secret not in err.details()
        return
    got = llama_call(cluster, method, secret)
    if method == "Status":  # internal paths and addresses for the operator only
        workers = list(got.router.workers)
        assert len(workers) == 1 and got.router.fingerprint
        if who == "the cluster token":
            assert got.model == cluster.model_path and workers[0].address == cluster.worker
        else:
            assert got.model == "(operators only)" and workers[0].address == ""
    elif method == "Tokenize":
        assert got
    else:  # two tokens generated; two scored (every prompt token after the first)
        assert len(got) == 2


def internal_call(c, service: str, method: str, secret: str | None):
    x = torch.randn(2, c.hidden)
    if service == "router":
        stub = router_pb2_grpc.RouterStub(channel(c.router, secret=secret))
        if method == "Status":
            return stub.Status(router_pb2.RouterStatusRequest(), timeout=10).workers[0].address
        if method == "WatchPlacement":  # the table pushed at once: the worker's address is in it
            call = stub.WatchPlacement(iter(()), timeout=30)
            try:
                return next(call).workers[0].address
            finally:
                call.cancel()
        req = router_pb2.RouteRequest(layer=0)
        write_tensor(req.x, x)
        if method == "Route":
            return list(stub.Route(req, timeout=30).y.shape)
        (resp,) = stub.RouteStream(iter([req]), timeout=30)
        return list(resp.y.shape)
    stub = expert_pb2_grpc.ExpertWorkerStub(channel(c.worker, secret=secret))
    req = expert_pb2.RunExpertsRequest(layer=0, expert_ids=[0, 1])
    write_tensor(req.x, x)
    if method == "RunExperts":
        return list(stub.RunExperts(req, timeout=30).y.shape)
    (resp,) = stub.RunExpertsStream(iter([req]), timeout=30)
    return list(resp.y.shape)


@pytest.mark.parametrize("service, method", sorted(INTERNAL_DOORS))
@pytest.mark.parametrize("who", sorted(CREDENTIALS))
def test_the_internal_services_open_only_to_the_cluster_token(cluster, service, method, who):
    secret = CREDENTIALS[who]
    if who not in INTERNAL_DOORS[service, method]:
        err = refusal(lambda: internal_call(cluster, service, method, secret))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not secret or secret not in err.details()
        return
    got = internal_call(cluster, service, method, secret)
    assert got == (cluster.worker if method in ("Status", "WatchPlacement") else [2, cluster.hidden])


@pytest.mark.parametrize("address", ["attention", "router", "worker"])
def test_health_and_reflection_stay_open(cluster, address):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = channel(getattr(cluster, address))  # Kubernetes probes carry no secret
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    assert any(s.name.startswith("herd.v1.") for a in answers for s in a.list_services_response.service)


def http_call(c, verb: str, path: str, secret: str | None):
    """(status, body) of one request: the official SDK for /v1/* when there is a secret to send."""
    if path.startswith("/v1/") and secret is not None:
        sdk = openai.OpenAI(base_url=c.http + "/v1", api_key=secret, max_retries=0)
        try:
            if path == "/v1/models":
                return 200, [m.id for m in sdk.models.list().data]
            if path == "/v1/completions":
                return 200, sdk.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2).usage
            return 200, sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2).usage
        except openai.APIStatusError as exc:
            return exc.status_code, {"error": exc.body}
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    body = {"model": MODEL, "max_tokens": 2, **({"prompt": [1, 2, 3]} if path == "/v1/completions" else
                                               {"messages": [{"role": "user", "content": "hi"}]})}
    resp = requests.request(verb, c.http + path, headers=headers, timeout=60, json=body if verb == "POST" else None)
    return resp.status_code, (resp.json() if resp.headers.get("content-type") == "application/json" else resp.text)


@pytest.mark.parametrize("verb, path", sorted(HTTP_DOORS))
@pytest.mark.parametrize("who", sorted(CREDENTIALS))
def test_each_http_route_opens_only_to_its_credentials(cluster, verb, path, who):
    secret = CREDENTIALS[who]
    status, body = http_call(cluster, verb, path, secret)
    if who not in HTTP_DOORS[verb, path]:
        assert status == 401, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
        assert not secret or secret not in err["message"]
        return
    assert status == 200, body
    if path == "/metrics":
        assert "herd:num_requests_running" in body
    elif path == "/v1/models":
        assert body == [MODEL]
    elif path != "/health":
        assert body.completion_tokens == 2


def test_herd_status_shows_the_workers_with_the_cluster_token_only(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    for name in ("HERD_API_KEY", CLUSTER_TOKEN_ENV, CLUSTER_TOKEN_ENV + "_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / API_KEY_FILE).write_text(KEY)
    assert cli.main(["status", "--target", cluster.attention]) == 0
    assert cluster.worker not in capsys.readouterr().out  # an API key sees no internal addresses
    token = tmp_path / CLUSTER_TOKEN_FILE
    token.write_text(TOKEN)
    token.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert cli.main(["status", "--target", cluster.attention]) == 0
    out = capsys.readouterr().out
    assert f"worker 0 {cluster.worker} SERVING" in out and f"model: {cluster.model_path}" in out
    assert TOKEN not in out and KEY not in out
    token.unlink()  # an operator elsewhere (a Kubernetes pod) has the token in the environment instead
    monkeypatch.setenv(CLUSTER_TOKEN_ENV, TOKEN)
    assert cli.main(["status", "--target", cluster.attention]) == 0
    assert f"worker 0 {cluster.worker} SERVING" in capsys.readouterr().out


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
        assert refusal(lambda: plain.Tokenize(llama_pb2.TokenizeRequest(text="hi"), timeout=5)).code() in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        server.stop(0)
