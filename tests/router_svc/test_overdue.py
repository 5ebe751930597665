"""The overdue bound and the choice of replicas around a worker that stopped answering (pure
logic: no servers; a Worker's channel is never used)."""
import pytest

from router_svc.placement import OVERDUE_CAP_S, OVERDUE_FLOOR_S, Latency, Placement, Worker


def test_the_bound_is_the_cap_until_a_first_answer_then_follows_latency_between_floor_and_cap():
    lat = Latency()
    assert lat.bound() == OVERDUE_CAP_S
    for _ in range(50):
        lat.observe(0.005)  # a fast worker: the floor keeps scheduling stalls from counting
    assert lat.bound() == OVERDUE_FLOOR_S
    steady = Latency()
    for _ in range(50):
        steady.observe(1.5)  # steady 1.5 s exchanges (a big prefill on a CPU): deviation decayed to ~0
    assert steady.bound() == pytest.approx(1.5, abs=0.01)
    jittery = Latency()
    for i in range(50):
        jittery.observe(0.2 if i % 2 else 0.6)  # mean ~0.4, mean deviation ~0.2: 0.4 + 4 * 0.2
    assert jittery.bound() == pytest.approx(1.2, abs=0.1)
    stalled = Latency()
    for _ in range(10):
        stalled.observe(20.0)  # however slow it is, a stopped worker is noticed within the cap
    assert stalled.bound() == OVERDUE_CAP_S


def test_one_slow_exchange_raises_the_bound_and_it_decays_back():
    lat = Latency()
    for _ in range(20):
        lat.observe(0.1)
    before = lat.bound()
    lat.observe(1.5)
    assert lat.bound() > before + 0.5
    for _ in range(40):
        lat.observe(0.1)
    assert lat.bound() == pytest.approx(before, abs=0.05)


def _worker(index, experts):
    return Worker(index, f"127.0.0.1:{1 + index}", experts, 1 << 20)  # nothing listens: never called here


def test_an_exchange_is_overdue_once_the_worker_answered_nothing_for_its_bound():
    w = _worker(0, [0])
    for _ in range(20):
        w.answered(0.01)
    bound = w.latency.bound()
    sent = w.heard_at + 0.5
    assert w.overdue_in(sent, sent) == pytest.approx(bound)
    assert w.overdue_in(sent, sent + bound + 0.01) < 0
    # An answer (a probe, another exchange) after the send restarts the clock: the worker is alive.
    w.heard_at = sent + 2.0
    assert w.overdue_in(sent, sent + bound + 0.01) == pytest.approx(2.0 - 0.01)
    w.mark_overdue()
    assert not w.answering() and w.usable()
    w.answered()  # a probe or a late answer takes it back
    assert w.answering() and not w.overdue_since


def _placement(holders: dict[int, list[int]], num_experts: int) -> Placement:
    p = Placement(registry=None, num_experts=num_experts, max_message_bytes=1 << 20)
    p.workers = {i: _worker(i, experts) for i, experts in holders.items()}
    p.replicas = {}
    for i, experts in sorted(holders.items()):
        for e in experts:
            p.replicas.setdefault(e, []).append(i)
    return p


def test_an_overdue_worker_keeps_only_the_experts_no_answering_replica_holds():
    p = _placement({0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [4, 5]}, 6)
    choice, complete = p.choice()
    assert complete and choice.tolist() == [0, 1, 0, 1, 2, 2]  # replicas spread by expert id
    p.workers[1].mark_overdue()
    assert p.choice()[0].tolist() == [0, 0, 0, 0, 2, 2]
    p.workers[2].mark_overdue()  # the only holder of 4 and 5: its rows wait for it (never -1)
    choice, complete = p.choice()
    assert complete and choice.tolist() == [0, 0, 0, 0, 2, 2]
    p.workers[0].mark_down()  # down (probe failed) and overdue: the overdue but healthy replica serves
    assert p.choice()[0].tolist() == [1, 1, 1, 1, 2, 2]
    for w in p.workers.values():
        w.answered()
    assert p.choice()[0].tolist() == [0, 1, 0, 1, 2, 2]
