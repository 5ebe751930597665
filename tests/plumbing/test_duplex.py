"""plumbing.duplex on a real gRPC stream over loopback: a server that hangs on one message
wedges the stream (answers come in order, so every exchange behind it waits); once the hung
exchange's caller has given up for STUCK_AFTER_S, the next send closes the wedged stream (its
other exchanges fail UNAVAILABLE, which the router retries) and opens a new one that answers.
A server that drops or repeats an answer breaks the stream's pairing: the exchange ids show it,
and no caller ever gets another's answer."""
import threading
import time

import grpc
import pytest

import plumbing.duplex as duplex
from herdpb import expert_pb2, expert_pb2_grpc
from plumbing.duplex import Duplex
from plumbing.grpc_server import channel, start_server

HANG, DROP, REPEAT = 7, 8, 9  # layers whose messages this server hangs on, leaves unanswered, answers twice


class _Misbehaving(expert_pb2_grpc.ExpertWorkerServicer):
    def __init__(self):
        self.release = threading.Event()

    def RunExpertsStream(self, request_iterator, context):
        for request in request_iterator:
            if request.layer == HANG:
                self.release.wait(30)
            if request.layer == DROP:
                continue
            answer = expert_pb2.RunExpertsResponse(y=request.x, exchange_id=request.exchange_id)
            yield answer
            if request.layer == REPEAT:
                yield answer


@pytest.fixture
def stream(monkeypatch):
    monkeypatch.setattr(duplex, "STUCK_AFTER_S", 0.3)
    servicer = _Misbehaving()
    server, port, _ = start_server(
        lambda s: expert_pb2_grpc.add_ExpertWorkerServicer_to_server(servicer, s), ["herd.v1.ExpertWorker"])
    d = Duplex(expert_pb2_grpc.ExpertWorkerStub(channel(f"127.0.0.1:{port}")).RunExpertsStream)
    try:
        yield d
    finally:
        servicer.release.set()
        d.close()
        server.stop(0)


def _req(layer, tag):
    req = expert_pb2.RunExpertsRequest(layer=layer)
    req.x.dtype = tag
    return req


def test_a_wedged_stream_is_replaced_after_its_caller_gave_up(stream):
    assert stream.send_all([_req(1, "a")]).result(5)[0].y.dtype == "a"
    hung = stream.send_all([_req(HANG, "hung")])
    behind = stream.send_all([_req(1, "behind")])  # waits behind the hung one
    wedged = stream._call
    with pytest.raises(grpc.RpcError) as err:
        hung.result(0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Not yet stuck: a send now still goes out on the same stream.
    early = stream.send_all([_req(1, "early")])
    assert stream._call is wedged
    time.sleep(0.4)
    fresh = stream.send_all([_req(1, "fresh")])
    assert stream._call is not wedged and wedged.broken is not None
    for ex in (behind, early):
        with pytest.raises(grpc.RpcError) as err:
            ex.result(5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fresh.result(5)[0].y.dtype == "fresh"


def test_a_late_answer_goes_to_its_own_timed_out_exchange_not_the_next(stream):
    """A caller that gives up before the answer comes does not wedge anything: when the answer
    comes it is dropped, and the next exchange gets its own."""
    first = stream.send_all([_req(1, "first")])
    with pytest.raises(grpc.RpcError):
        first.result(0.0)
    second = stream.send_all([_req(1, "second")])
    assert second.result(5)[0].y.dtype == "second"
    assert stream._call.broken is None


@pytest.mark.parametrize("bad", [DROP, REPEAT])
def test_a_lost_or_repeated_answer_fails_the_stream_not_another_caller(stream, bad):
    """Without exchange ids the answer after a dropped one would go to the dropped exchange's
    caller (and a repeated one to the next caller): each exchange would get another's rows."""
    first = stream.send_all([_req(bad, "first")])
    second = stream.send_all([_req(1, "second")])
    broken = stream._call
    if bad == REPEAT:  # its own answer comes first; the repeat then arrives where "second" is awaited
        assert first.result(5)[0].y.dtype == "first"
    else:
        with pytest.raises(grpc.RpcError) as err:
            first.result(5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:
        second.result(5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "message" in err.value.details()
    assert broken.broken is not None
    third = stream.send_all([_req(1, "third"), _req(1, "fourth")])  # a new stream, numbered afresh
    assert stream._call is not broken
    assert [r.y.dtype for r in third.result(5)] == ["third", "fourth"]
    assert [r.exchange_id for r in third.result(5)] == [1, 2]
