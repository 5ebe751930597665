"""No 500 from the HTTP API: strings that are not valid Unicode are a 400 naming their field, and
an error herd did not expect is OpenAI's 500 body naming nothing internal, counted in /metrics;
either way the server goes on serving everyone else. A real server in this process."""
import json

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from attention_svc import http_api
from attention_svc.http_api import create_app, serve_http
from attention_svc.server import build
from llama4.store import write_random_checkpoint

MODEL = "scout"
SECRET_DETAIL = "/srv/herd/secret-internal-path"


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    path = write_random_checkpoint("tiny-scout", tmp_path_factory.mktemp("scout"))  # Llama 4's vocabulary
    servicer, _ = build(str(path), None, torch.float32, "cpu", {})
    server, port = serve_http(create_app(servicer, MODEL, metrics=servicer.loop.metrics), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url + "/health", timeout=1)
            break
        except requests.ConnectionError:
            import time

            time.sleep(0.1)
    yield url
    server.should_exit = True


def post(url: str, path: str, raw: str, stream: bool = False) -> requests.Response:
    return requests.post(url + path, data=raw.encode(), headers={"Content-Type": "application/json"}, timeout=60,
                         stream=stream)


def internal_errors(url: str) -> dict:
    text = requests.get(url + "/metrics", timeout=10).text
    return {s.labels["route"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "herd:http_internal_errors_total"}


def assert_serving(url: str) -> None:
    done = requests.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2,
                                                        "ignore_eos": True}, timeout=60)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
    chat = requests.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi \U0001f600"}], "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


LONE = "\\udcff"  # as it travels: a JSON escape of an unpaired (low) surrogate; "@" below stands for it
COMPLETION = '{"model": "scout", "prompt": "hi", "max_tokens": 2, '
CHAT = '{"model": "scout", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
PART = '{"model": "scout", "messages": [{"role": "user", "content": [%s]}]}'


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", '{"model": "@", "prompt": "hi"}', "model"),
    ("/v1/completions", '{"model": "scout", "prompt": "a @ b"}', "prompt"),
    ("/v1/completions", '{"model": "scout", "prompt": ["ok", "@"]}', "prompt[1]"),
    ("/v1/completions", COMPLETION + '"stop": ["x", "@"]}', "stop[1]"),
    ("/v1/completions", COMPLETION + '"user": "@"}', "user"),
    ("/v1/completions", COMPLETION + '"session_id": "@"}', "session_id"),
    ("/v1/completions", COMPLETION + '"stream": true, "stream_options": {"x@": 1}}', "stream_options"),
    ("/v1/completions", COMPLETION + '"@": 1}', None),
    ("/v1/completions", '"@"', None),
    ("/v1/chat/completions", '{"model": "@", "messages": []}', "model"),
    ("/v1/chat/completions", '{"model": "scout", "messages": [{"role": "user", "content": "@"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "scout", "messages": [{"role": "u@", "content": "hi"}]}', "messages[0].role"),
    ("/v1/chat/completions", PART.replace("%s", '{"type": "text", "text": "\\ud800"}'),
     "messages[0].content[0].text"),
    ("/v1/chat/completions", PART.replace("%s", '{"type": "image_url", "image_url": {"url": "data:@"}}'),
     "messages[0].content[0].image_url.url"),
    ("/v1/chat/completions", CHAT + '"metadata": {"k": "@"}}', "metadata.k"),
    ("/v1/chat/completions", CHAT + '"stop": "@", "stream": true}', "stop"),
])
def test_a_string_that_is_not_unicode_is_a_400_naming_its_field(http, path, raw, param):
    before = internal_errors(http)
    resp = post(http, path, raw.replace("@", LONE))
    assert resp.status_code == 400, resp.text[:300]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and "surrogate" in err["message"]
    assert "\\udcff" in err["message"] or "\\ud800" in err["message"]  # which character, escaped
    assert internal_errors(http) == before
    assert_serving(http)


def test_surrogate_pairs_are_valid_unicode(http):
    resp = post(http, "/v1/completions", '{"model": "scout", "prompt": "smile \\ud83d\\ude00", "max_tokens": 1}')
    assert resp.status_code == 200, resp.text[:300]


def test_a_body_nested_too_deeply_is_a_400(http):
    resp = post(http, "/v1/completions", "[" * 100_000 + "]" * 100_000)
    assert resp.status_code == 400 and "deeply" in resp.json()["error"]["message"]
    assert_serving(http)


def _boom(*_args, **_kwargs):
    raise RuntimeError(f"cannot open {SECRET_DETAIL}")


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
])
def test_an_unexpected_error_is_openais_500_naming_nothing_internal_and_counted(http, monkeypatch, path, body):
    before = internal_errors(http).get(path, 0)
    monkeypatch.setattr(http_api.OpenAIFrontend, "submit", _boom)
    resp = requests.post(http + path, json=body, timeout=60)
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error" and err["message"]
    assert SECRET_DETAIL not in resp.text and "RuntimeError" not in resp.text and "Traceback" not in resp.text
    assert internal_errors(http)[path] == before + 1
    monkeypatch.undo()
    assert_serving(http)


def test_an_unexpected_error_mid_stream_ends_it_with_an_error_event_and_is_counted(http, monkeypatch):
    before = internal_errors(http).get("/v1/completions", 0)
    real = http_api._Choice.next
    calls = []

    async def next_then_boom(self):
        calls.append(1)
        if len(calls) > 2:
            _boom()
        return await real(self)

    monkeypatch.setattr(http_api._Choice, "next", next_then_boom)
    with post(http, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 50,
                                                   "ignore_eos": True, "stream": True}), stream=True) as resp:
        assert resp.status_code == 200
        events = [line[len(b"data: "):] for line in resp.iter_lines() if line]
    assert len(events) == 3 and all("choices" in json.loads(e) for e in events[:2])
    err = json.loads(events[-1])["error"]
    assert err["type"] == "server_error" and SECRET_DETAIL not in events[-1].decode()
    assert internal_errors(http)["/v1/completions"] == before + 1
    monkeypatch.undo()
    assert_serving(http)


def test_an_unexpected_error_in_metrics_is_a_500_too(http, monkeypatch):
    monkeypatch.setattr("attention_svc.metrics.AttentionMetrics.exposition", _boom)
    resp = requests.get(http + "/metrics", timeout=10)
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
    assert SECRET_DETAIL not in resp.text
    monkeypatch.undo()
    assert internal_errors(http)["/metrics"] >= 1
    assert requests.get(http + "/v1/models", timeout=10).json()["data"][0]["id"] == MODEL


def test_a_failed_model_step_is_a_503_that_names_nothing_internal(http, monkeypatch):
    from llama4.engine import Engine

    monkeypatch.setattr(Engine, "_run", _boom)  # e.g. the router unreachable: its RpcError names its address
    resp = requests.post(http + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
    assert SECRET_DETAIL not in resp.text and "retry" in resp.json()["error"]["message"]
    monkeypatch.undo()
    assert_serving(http)
