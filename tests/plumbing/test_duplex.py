"""plumbing.duplex on a real gRPC stream over loopback: a server that hangs on one message
wedges the stream (answers come in order, so every exchange behind it waits); once the hung
exchange's caller has given up for STUCK_AFTER_S, the next send closes the wedged stream (its
other exchanges fail UNAVAILABLE, which the router retries) and opens a new one that answers."""
import threading
import time

import grpc
import pytest

import plumbing.duplex as duplex
from herdpb import expert_pb2, expert_pb2_grpc
from plumbing.duplex import Duplex
from plumbing.grpc_server import channel, start_server

HANG = 7  # the layer whose messages this server hangs on (until the test ends)


class _Hanging(expert_pb2_grpc.ExpertWorkerServicer):
    def __init__(self):
        self.release = threading.Event()

    def RunExpertsStream(self, request_iterator, context):
        for request in request_iterator:
            if request.layer == HANG:
                self.release.wait(30)
            yield expert_pb2.RunExpertsResponse(y=request.x)


@pytest.fixture
def stream(monkeypatch):
    monkeypatch.setattr(duplex, "STUCK_AFTER_S", 0.3)
    servicer = _Hanging()
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
