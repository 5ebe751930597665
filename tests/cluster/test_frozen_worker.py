"""A worker frozen under load (SIGSTOP on its process: alive, its sockets open, answering
nothing). With `replicas: 2` its overdue exchanges are hedged onto the live replica within
seconds and requests never wait for the freeze; after SIGCONT it is taken back; so in both
dispatch modes (through the router, or `dispatch: direct` from the attention service itself).
Without a replica, requests wait for it and complete correctly once it answers: none fails.

STREAMS concurrent streams (not the 16 of the report: the suite runs on a 2-core machine)."""
from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
import torch
from cluster_load import Load

from herd.client import Client
from llama4.engine import Engine, Request
from llama4.sampling import SamplingParams

STREAMS, MAX_TOKENS, PROMPT_TOKENS = 6, 12, 10
FREEZE_S = 10.0
DURING_FREEZE_BOUND_S = 5.0  # each request that starts during the freeze finishes within this (with a replica)


def _prompts(n: int) -> list[list[int]]:
    return [torch.randint(3, 200000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(50 + i)).tolist()
            for i in range(n)]


def _expected(mono, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r.output_ids for r in Engine(mono).run([Request(p, params) for p in prompts])]


def _worker_pid(cluster, index: int) -> int:
    import ray  # not at the top: Ray reads its auth settings when imported, and herd up sets them first

    infos = ray.get([a.info.remote() for a in cluster.actors], timeout=30)
    return next(info["pid"] for info in infos if info.get("index") == index)


def _router_worker(client, index: int):
    return next(w for w in client.status().router.workers if w.index == index)


def _metric(cluster, name: str) -> float:
    text = urllib.request.urlopen(f"http://{cluster.router_metrics_address}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def _freeze(pid: int, seconds: float, watch) -> tuple[float, float, float | None]:
    """SIGSTOP pid for `seconds` (SIGCONT always follows); (stopped at, continued at, when
    watch(seconds frozen so far) first held during the freeze, or None)."""
    seen = None
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while time.monotonic() - stopped < seconds:
            if seen is None and watch(time.monotonic() - stopped):
                seen = time.monotonic()
            time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    return stopped, time.monotonic(), seen


def _check_tokens(done, expected) -> None:
    failed = [(s, i, got) for s, i, _, _, got in done if isinstance(got, Exception)]
    assert not failed, failed
    wrong = [(s, i) for s, i, _, _, got in done if got != expected[i]]
    assert not wrong, wrong


@pytest.mark.parametrize("dispatch", ["router", "direct"])
def test_a_frozen_worker_is_routed_around_to_its_replica_and_taken_back(local_cluster, mono, dispatch):
    prompts = _prompts(2 * STREAMS)
    expected = _expected(mono, prompts)
    with local_cluster(workers=2, replicas=2, dispatch=dispatch) as cluster:
        client = Client(cluster.attention_address)
        assert all(len(w.experts) == 128 for w in client.status().router.workers)  # each holds every expert
        pid = _worker_pid(cluster, 0)
        with Load(cluster.attention_address, prompts, STREAMS, MAX_TOKENS) as load:
            time.sleep(3.0)  # steady state: recent latencies for the overdue bound
            stopped, continued, detected = _freeze(pid, FREEZE_S, lambda _: _metric(cluster, "herd:worker_overdue") > 0
                                                   or not _router_worker(client, 0).healthy)
            hedges = _metric(cluster, "herd:hedged_exchanges_total")
            time.sleep(2.0)
        done = list(load.done)
        _check_tokens(done, expected)
        before = [end - start for _, _, start, end, _ in done if end < stopped]
        in_flight = [end for _, _, start, end, _ in done if start < stopped < end]  # at the SIGSTOP
        during = [(start - stopped, end - start) for _, _, start, end, _ in done if stopped + 0.5 <= start < continued]
        print(f"\nundisturbed latency max {max(before, default=0):.2f}s over {len(before)} requests; detected "
              f"{(detected or continued) - stopped:.2f}s after SIGSTOP; {hedges:.0f} hedged exchanges; the "
              f"{len(in_flight)} in flight ended {max(in_flight, default=stopped) - stopped:.2f}s after it; requests "
              f"that started during the freeze: {len(during)}, latency max "
              f"{max((d for _, d in during), default=0):.2f}s")
        assert detected is not None and detected - stopped < 3.0
        assert hedges >= 1
        assert all(end < stopped + DURING_FREEZE_BOUND_S for end in in_flight)  # none waited for the freeze
        assert len(during) >= 2 * STREAMS  # the load kept going through the freeze
        assert all(d < DURING_FREEZE_BOUND_S for _, d in during), during  # those early in it ended well before it
        # Taken back: healthy again, and it serves rows again.
        until = time.monotonic() + 10
        while not _router_worker(client, 0).healthy and time.monotonic() < until:
            time.sleep(0.2)
        assert _router_worker(client, 0).healthy and _metric(cluster, "herd:worker_overdue") == 0
        assert not _router_worker(client, 0).overdue and client.status().router.hedges == hedges  # herd status says so
        rows = _router_worker(client, 0).rows
        got = [t for msg in client.generate(ids=prompts[0], max_tokens=MAX_TOKENS, ignore_eos=True)
               for t in msg.token_ids]
        assert got == expected[0]
        until = time.monotonic() + 5  # direct: the attention service reports its rows about once a second
        while _router_worker(client, 0).rows == rows and time.monotonic() < until:
            time.sleep(0.2)
        assert _router_worker(client, 0).rows > rows


def test_without_a_replica_requests_wait_for_a_frozen_worker_and_none_fails(local_cluster, mono):
    prompts = _prompts(STREAMS)
    expected = _expected(mono, prompts)
    with local_cluster(workers=2, replicas=1) as cluster:
        client = Client(cluster.attention_address)
        pid = _worker_pid(cluster, 0)
        late = Load(cluster.attention_address, prompts, STREAMS, MAX_TOKENS)  # streams that start while it is frozen
        with Load(cluster.attention_address, prompts, STREAMS, MAX_TOKENS) as load:
            time.sleep(3.0)
            # 2 s into the freeze the late streams start (watch() holds from then on: it runs once).
            stopped, continued, _ = _freeze(pid, 6.0, lambda frozen_s: frozen_s > 2.0 and late.__enter__() is late)
            time.sleep(3.0)
            late.__exit__()
        done = list(load.done) + list(late.done)
        _check_tokens(done, expected)
        waited = [end for _, _, start, end, _ in done if start < continued - 1.0 and end > stopped + 0.5]
        assert len(waited) >= 2 * STREAMS  # in flight at the freeze, or started during it
        assert all(end >= continued for end in waited)  # they waited for it, then completed
        assert _metric(cluster, "herd:hedged_exchanges_total") == 0
        assert _router_worker(client, 0).healthy
