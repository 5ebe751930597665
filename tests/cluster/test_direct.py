"""`dispatch: direct` on the real cluster (herd up: Redis, Ray, expert workers, router, attention):
the attention service gates each MoE layer's rows and sends them to the workers itself, with the
table the router pushes. With 1 and 2 micro-batches greedy tokens, log-probs and scores equal the
monolithic model (within 1e-5) and the trace names the expert and worker of every token; the
router dispatches nothing itself yet counts the load (herd status, /metrics); a worker SIGKILLed
under load fails no request and changes no token, as in router mode."""
import os
import signal
import time
import urllib.request

import pytest
import torch
from cluster_load import Load

from herd.client import Client
from herdpb import llama_pb2
from llama4.engine import Engine, Request
from llama4.sampling import SamplingParams

STREAMS, MAX_TOKENS = 4, 16


@pytest.fixture(scope="module", params=[1, 2], ids=["1-micro-batch", "2-micro-batches"])
def cluster(request, local_cluster):
    with local_cluster(workers=4, dispatch="direct", route_timeout_s=90.0,
                       batching={"micro_batches": request.param}) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return Client(cluster.attention_address, timeout=120)


def prompts(n, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200000, (int(l),), generator=gen).tolist()
            for l in torch.randint(4, 60, (n,), generator=gen)]


def stream(client, ids, max_tokens):
    tokens, logprobs = [], []
    req = llama_pb2.GenerateRequest(ids=llama_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.ignore_eos = max_tokens, True
    for msg in client.stub.Generate(req, timeout=120):
        tokens.extend(msg.token_ids)
        logprobs.extend(msg.logprobs)
    return tokens, logprobs


def router_metric(cluster, name: str) -> float:
    text = urllib.request.urlopen(f"http://{cluster.router_metrics_address}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_tokens_and_logprobs_equal_monolithic_and_the_router_counts_the_load(cluster, client, mono):
    from concurrent.futures import ThreadPoolExecutor

    ps = prompts(8)
    want = Engine(mono).run([Request(p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)) for p in ps])
    before = client.status()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: stream(client, p, MAX_TOKENS), ps))
    for seq, (tokens, logprobs) in zip(want, got, strict=True):
        assert tokens == seq.output_ids
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(seq.output_logprobs), atol=1e-5)
    after = client.status()
    assert after.dispatch == "direct" and after.placement_version >= 1
    steps, routes = after.steps - before.steps, after.route_rpcs - before.route_rpcs
    micro_batches = cluster.cfg.batching.micro_batches
    assert (routes == steps * 2) if micro_batches == 1 else (steps * 2 < routes <= steps * 2 * micro_batches)
    # The router counted what the attention service sent (reported about once a second) ...
    counted = until(lambda: (s := client.status()).router.routes - before.router.routes == routes and s, 10,
                    "the router counting the reported exchanges")
    tokens = after.tokens_computed - before.tokens_computed
    for layer_before, layer_after in zip(before.router.loads, counted.router.loads, strict=True):
        assert sum(layer_after.tokens_per_expert) - sum(layer_before.tokens_per_expert) == tokens
    rows = sum(w.rows for w in counted.router.workers) - sum(w.rows for w in before.router.workers)
    assert rows == tokens * 2  # every token through both MoE layers
    # ... and dispatched none of it itself: no exchange of its own with a worker.
    assert router_metric(cluster, "herd:worker_rpc_seconds_count") == 0
    assert router_metric(cluster, "herd:placement_watchers") == 1


def test_scores_equal_monolithic(client, mono):
    ids = prompts(1, seed=8)[0] + prompts(1, seed=9)[0]
    (seq,) = Engine(mono).run([Request(ids, SamplingParams(max_tokens=0), prompt_logprobs=True)])
    resp = client.score(ids=ids)
    assert list(resp.ids) == ids
    assert torch.allclose(torch.tensor(list(resp.logprobs)), torch.tensor(seq.prompt_logprobs[1:]), atol=1e-5)


def test_the_trace_names_the_expert_and_worker_of_every_token(client, mono):
    p = prompts(1, seed=21)[0]
    engine = Engine(mono)
    engine.add(Request(p, SamplingParams(max_tokens=6, ignore_eos=True), trace_routes=True))
    expected = []
    while engine.has_work:
        expected += [[e for _, e, _ in ev.route] for ev in engine.step() if ev.token is not None]
    got = [msg for msg in client.generate(ids=p, max_tokens=6, ignore_eos=True, trace_routes=True) if msg.token_ids]
    assert [[h.expert for h in m.route] for m in got] == expected
    assert all(h.worker == h.expert // 32 for m in got for h in m.route)  # contiguous: 32 experts per worker


def test_a_worker_killed_under_load_fails_no_request_and_changes_no_token(cluster, client, mono):
    ps = prompts(2 * STREAMS, seed=31)
    want = [s.output_ids for s in Engine(mono).run([Request(p, SamplingParams(max_tokens=MAX_TOKENS,
                                                                                ignore_eos=True)) for p in ps])]
    pids = cluster.worker_pids()
    retries = client.status().router.retries
    with Load(cluster.attention_address, ps, STREAMS, MAX_TOKENS) as load:
        until(lambda: len(load.done) >= STREAMS, 120, "steady load")
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()

        def restarted():
            try:
                return cluster.worker_pids()[1] != pids[1]
            except Exception:  # Ray is restarting it
                return False

        until(restarted, 120, "Ray restarting worker 1")
        until(lambda: next(w for w in client.status().router.workers if w.index == 1).healthy, 60,
              "the router serving worker 1 again")
        back = time.monotonic()
        served = len(load.done)
        until(lambda: len(load.done) >= served + STREAMS, 120, "requests after the restart")
    done = list(load.done)
    failed = [(i, got) for _, i, _, _, got in done if isinstance(got, Exception)]
    assert not failed, failed
    assert [i for _, i, _, _, got in done if got != want[i]] == []
    assert any(start < killed < end for _, _, start, end, _ in done)  # some were in flight at the kill
    # The attention service retried them (its rows went again to the restarted worker) and told the router.
    until(lambda: client.status().router.retries > retries, 10, "the router counting the reported retries")
    print(f"\n{len(done)} requests, {sum(start < killed < end for _, _, start, end, _ in done)} in flight at the "
          f"SIGKILL; worker 1 back after {back - killed:.1f}s")


def test_a_killed_router_stops_no_request_and_the_table_stream_is_reopened(cluster, client, mono):
    """The data path does not pass through the router: while it is down (SIGKILL, then herd up's
    supervisor restarts it on its port) requests are served on the last table, with the same
    tokens; the restarted router pushes its table again and counts the load from then on."""
    ps = prompts(2, seed=41)
    want = [s.output_ids for s in Engine(mono).run([Request(p, SamplingParams(max_tokens=8, ignore_eos=True))
                                                    for p in ps])]
    old = cluster.procs["router"].pid
    os.kill(old, signal.SIGKILL)
    cluster.procs["router"].wait(10)
    assert [t for m in client.generate(ids=ps[0], max_tokens=8, ignore_eos=True) for t in m.token_ids] == want[0]
    until(lambda: cluster.supervise() and cluster.procs["router"].pid != old, 60, "herd up restarting the router")
    until(lambda: router_metric(cluster, "herd:placement_watchers") == 1, 30, "the attention service watching again")
    assert [t for m in client.generate(ids=ps[1], max_tokens=8, ignore_eos=True) for t in m.token_ids] == want[1]
    until(lambda: client.status().router.routes > 0, 10, "the new router counting the reported exchanges")
