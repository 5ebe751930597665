"""The OpenAI-compatible HTTP API, Prometheus metrics and Ray metrics of a real `herd up` on the
default model, driven by the official `openai` SDK."""
import json
import re
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from herd.client import Client
from llama4.store import DEFAULT_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(local_cluster):
    with local_cluster(model=DEFAULT_MODEL, workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(cluster):
    return openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key=cluster.api_key, max_retries=0)


def scrape(address: str, key: str | None = None) -> dict:
    """{sample name: {labels as a sorted tuple: value}} from a /metrics endpoint."""
    req = urllib.request.Request(f"http://{address}/metrics",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_models_lists_the_served_model(sdk):
    assert [m.id for m in sdk.models.list().data] == [DEFAULT_MODEL]


def test_chat_streams_an_answer_naming_paris(sdk):
    chunks = list(sdk.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, stream=True, max_tokens=24,
                                              temperature=0, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "Paris" in "".join(deltas) and sum(1 for d in deltas if d) >= 3  # streamed, not one piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens >= 3
    assert usage.prompt_tokens > 10 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_uses_the_checkpoint_template_like_grpc(cluster, sdk):
    http = sdk.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=16, temperature=0,
                                       extra_body={"return_token_ids": True})
    grpc_tokens = [t for msg in Client(cluster.attention_address).generate(chat=QUESTION, max_tokens=16)
                   for t in msg.token_ids]
    assert http.model_extra is not None
    assert http.choices[0].model_extra["token_ids"] == grpc_tokens
    assert http.usage.completion_tokens == len(grpc_tokens)


def test_completion_logprobs_equal_grpc_score(cluster, sdk):
    prompt = "The river flows past the old mill and"
    r = sdk.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                               extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = r.choices[0]
    generated = choice.model_extra["token_ids"]
    assert choice.finish_reason == "length" and len(generated) == 8
    assert len(choice.logprobs.top_logprobs[0]) == 3
    client = Client(cluster.attention_address)
    prompt_ids = list(client.score(text=prompt).ids)  # the same tokenization (with BOS) as the HTTP prompt
    scored = list(client.score(ids=prompt_ids + generated).logprobs)[len(prompt_ids) - 1:]
    # Decode (one row a step, over the KV cache) and Score (the whole sequence in one pass) compute
    # each logprob in a different order: equal to fp32's relative precision, not bit for bit.
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(choice.logprobs.token_logprobs, scored,
                                                                     strict=True))


def test_stop_strings_cut_the_text(sdk):
    r = sdk.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                    stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.strip()


def test_n_choices_with_a_seed_are_reproducible(sdk):
    ask = lambda: sdk.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=12, n=2,
                                         temperature=1.0, seed=7)
    a, b = ask(), ask()
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1] and texts == [c.text for c in b.choices]
    assert texts[0] != texts[1]
    assert a.usage == b.usage and 2 <= a.usage.completion_tokens <= 24


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=5), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(logprobs=9), "logprobs"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(extra_body={"top_k": "ten"}), "top_k"),
])
def test_bad_parameters_are_400_with_the_param_named(sdk, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model=DEFAULT_MODEL, prompt="hello", **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]


def test_unknown_model_and_missing_key_are_refused(cluster, sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4", prompt="hello")
    anonymous = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    resp = requests.post(f"http://{cluster.http_address}/v1/completions", data=b"{not json", timeout=30,
                         headers={"Authorization": f"Bearer {cluster.api_key}"})
    assert resp.status_code == 400 and "error" in resp.json()


def test_the_cluster_token_is_no_api_key(cluster):
    as_service = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key=cluster.cluster_token,
                               max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        as_service.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=2)
    assert err.value.body["code"] == "invalid_api_key" and cluster.cluster_token not in str(err.value.body)
    with pytest.raises(openai.AuthenticationError):
        as_service.models.list()
    assert "herd:num_requests_running" in scrape(cluster.http_address, cluster.cluster_token)  # operators read it


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", '{"model": "%s", "prompt": "a \\udcff b", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "\\udcff%s", "messages": []}', "model"),
])
def test_strings_that_are_not_unicode_are_a_400_naming_the_field(cluster, sdk, path, raw, param):
    resp = requests.post(f"http://{cluster.http_address}{path}", data=(raw % DEFAULT_MODEL).encode(), timeout=30,
                         headers={"Authorization": f"Bearer {cluster.api_key}", "Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    err = resp.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"] and err["type"] == "invalid_request_error"
    assert sdk.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_metrics_count_the_requests_and_their_routed_tokens(cluster, sdk):
    before = scrape(cluster.http_address, cluster.api_key)
    routed_before = scrape(cluster.router_metrics_address)
    for i in range(3):
        sdk.completions.create(model=DEFAULT_MODEL, prompt=f"Count to {i + 3}:", max_tokens=6, temperature=0,
                               extra_body={"ignore_eos": True})
    after = scrape(cluster.http_address, cluster.api_key)
    routed_after = scrape(cluster.router_metrics_address)
    count = lambda m, name: sum(m.get(name, {}).values())
    assert count(after, "herd:time_to_first_token_seconds_count") - count(
        before, "herd:time_to_first_token_seconds_count") == 3
    assert count(after, "herd:request_success_total") - count(before, "herd:request_success_total") == 3
    tokens = count(after, "herd:request_prompt_tokens_sum") - count(before, "herd:request_prompt_tokens_sum") + 3 * 6
    # Every token but the last of each request ran through every MoE layer once.
    layers = len({dict(k)["layer"] for k in routed_after["herd:routed_tokens_total"]})
    routed = count(routed_after, "herd:routed_tokens_total") - count(routed_before, "herd:routed_tokens_total")
    assert routed == (tokens - 3) * layers
    for name in ("herd:num_requests_running", "herd:kv_cache_usage_perc", "herd:kv_tier_hits_total",
                 "herd:inter_token_latency_seconds_count", "herd:e2e_request_latency_seconds_count"):
        assert name in after, name
    assert "herd:worker_rpc_seconds_count" in routed_after
    info = json.loads((cluster_home() / "cluster.json").read_text())
    assert info["http"] == cluster.http_address and len(info["workers"]) == 2
    names = set(after) | set(routed_after)
    for w in info["workers"]:  # every worker's own endpoint answers
        m = scrape(w["metrics"])
        assert m["herd:expert_rows_total"][()] > 0 and "herd:expert_resident_bytes" in m
        names |= set(m)
    # The Grafana board asks only for series herd exports (a renamed metric would blank a panel).
    board = json.loads((Path(__file__).resolve().parents[2] / "k8s/monitoring/grafana-dashboard.json").read_text())
    asked = {n for p in board["panels"] for t in p["targets"] for n in re.findall(r"herd:[a-z0-9_:]+", t["expr"])}
    assert asked and asked <= names, asked - names


def cluster_home():
    from llama4.store import cache_home

    return cache_home()


def test_client_disconnect_mid_stream_frees_its_sequence(cluster, sdk):
    running = lambda: scrape(cluster.http_address, cluster.api_key)["herd:num_requests_running"][()]
    with requests.post(f"http://{cluster.http_address}/v1/completions", stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {cluster.api_key}"},
                       json={"model": DEFAULT_MODEL, "prompt": "Tell me a long story:", "max_tokens": 2000,
                             "stream": True, "ignore_eos": True}) as resp:
        events = (line for line in resp.iter_lines() if line)
        for _ in range(4):
            assert next(events).startswith(b"data: {")
        assert running() == 1
    deadline = time.monotonic() + 20
    while running() != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0


def test_worker_load_is_a_ray_metric(cluster, sdk):
    sdk.completions.create(model=DEFAULT_MODEL, prompt="Ray", max_tokens=4)
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        seen = scrape(f"127.0.0.1:{cluster.ray_metrics_port}")
        rows = {dict(k).get("worker"): v for k, v in seen.get("ray_herd_expert_rows_total", {}).items()}
        if set(rows) == {"0", "1"} and all(v > 0 for v in rows.values()):
            break
        time.sleep(2)
    assert set(rows) == {"0", "1"}, sorted(seen)[:20]
    assert any(v > 0 for v in seen.get("ray_herd_expert_resident_bytes", {}).values())


def test_sessions_and_route_traces_through_extra_fields(cluster, sdk):
    first_q = {"role": "user", "content": "My name is Ada. Say hello."}
    second_q = {"role": "user", "content": "What is my name?"}
    first = sdk.chat.completions.create(model=DEFAULT_MODEL, messages=[first_q], max_tokens=12, temperature=0,
                                        extra_body={"session_id": "http-1", "new_session": True})
    answer = {"role": "assistant", "content": first.choices[0].message.content}
    second = sdk.chat.completions.create(model=DEFAULT_MODEL, messages=[second_q], max_tokens=12, temperature=0,
                                         extra_body={"session_id": "http-1", "trace_routes": True,
                                                     "return_token_ids": True})
    # The second turn saw the whole conversation: the same tokens as asking for it in one go over gRPC.
    whole = [t for msg in Client(cluster.attention_address).generate(chat=[first_q, answer, second_q], max_tokens=12)
             for t in msg.token_ids]
    assert second.choices[0].model_extra["token_ids"] == whole
    routes = second.choices[0].model_extra["routes"]
    assert len(routes) == len(whole) and all(len(hops) == len(routes[0]) > 0 for hops in routes)
    assert all(0 <= worker < 2 for hops in routes for _, _, worker in hops)
    with pytest.raises(openai.ConflictError):  # the session exists: new_session again is refused
        sdk.chat.completions.create(model=DEFAULT_MODEL, messages=[first_q], max_tokens=4,
                                    extra_body={"session_id": "http-1", "new_session": True})


def test_ray_dashboard_token_is_in_a_private_file_and_nowhere_else(cluster):
    import os
    import stat

    path = cluster.ray_token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert token == os.environ["RAY_AUTH_TOKEN"] and len(token) >= 32
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        assert token.encode() not in argv, pid


def test_only_the_attention_service_holds_the_api_keys(cluster):
    import os

    from herd.up import _ray_children

    def environ(pid: int) -> bytes:
        try:
            return open(f"/proc/{pid}/environ", "rb").read()
        except OSError:  # gone meanwhile
            return b""

    key, token = cluster.api_key.encode(), cluster.cluster_token.encode()
    ray = [environ(p.pid) for p in _ray_children()]  # the expert workers among them
    holds = {  # (API key, cluster token); booleans only, so a failure prints no secret
        "attention": (key in environ(cluster.procs["attention"].pid), token in environ(cluster.procs["attention"].pid)),
        "router": (key in environ(cluster.procs["router"].pid), token in environ(cluster.procs["router"].pid)),
        "ray": (any(key in env for env in ray), any(token in env for env in ray)),
        "herd up": (key.decode() in os.environ.get("HERD_API_KEYS", ""), True)}
    assert holds == {"attention": (True, True), "router": (False, True), "ray": (False, True), "herd up": (False, True)}


_LONE_SURROGATE = st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.sampled_from(["\udcff", "\ud800"]),
                            st.text(max_size=4))  # json.dumps sends it as an escape: not valid Unicode
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=12), _LONE_SURROGATE, st.lists(st.integers(-5, 300000), max_size=4),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_MESSAGES = st.one_of(_ANY, st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "robot", 3]),
     "content": st.one_of(st.text(max_size=20), _LONE_SURROGATE, st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=2), _ANY)}),
    min_size=0, max_size=3))
_PARAMS = {
    "max_tokens": st.one_of(st.integers(1, 3), _ANY), "temperature": st.one_of(st.floats(0, 2), _ANY),
    "top_p": st.one_of(st.floats(0.01, 1), _ANY), "n": st.one_of(st.integers(1, 2), _ANY),
    "seed": st.one_of(st.integers(0, 2**64), _ANY), "stop": st.one_of(st.text(max_size=3), _ANY),
    "logprobs": _ANY, "top_logprobs": _ANY, "stream": st.booleans(), "stream_options": _ANY, "user": _ANY,
    "presence_penalty": _ANY, "session_id": _ANY, "top_k": _ANY, "stop_token_ids": _ANY, "echo": _ANY,
    "max_completion_tokens": _ANY, "bogus": _ANY,
}


@st.composite
def _bodies(draw):
    chat = draw(st.booleans())
    body = {"model": draw(st.one_of(st.just(DEFAULT_MODEL), st.just(DEFAULT_MODEL), _ANY))}
    if chat:
        body["messages"] = draw(_MESSAGES)
    else:
        body["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 49151), max_size=5),
                                        _ANY))
    for name in draw(st.lists(st.sampled_from(sorted(_PARAMS)), max_size=4, unique=True)):
        if chat or name not in ("max_completion_tokens", "top_logprobs"):
            body[name] = draw(_PARAMS[name])
    body.setdefault("max_tokens", 2)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@settings(max_examples=80, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(call=_bodies())
def test_fuzzed_http_requests_get_an_answer_or_a_proper_error(cluster, call):
    path, body = call
    try:
        data = json.dumps(body, allow_nan=True)
    except (TypeError, ValueError):
        return
    resp = requests.post(f"http://{cluster.http_address}{path}", data=data, timeout=120,
                         headers={"Authorization": f"Bearer {cluster.api_key}", "Content-Type": "application/json"})
    assert resp.status_code in (200, 400, 404, 409), (resp.status_code, resp.text[:300], body)
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    elif body.get("stream") is True:
        assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
    else:
        assert resp.json()["choices"]


def test_the_server_still_serves_after_the_fuzz(sdk):
    r = sdk.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content
