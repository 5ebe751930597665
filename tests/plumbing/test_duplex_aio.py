"""plumbing.duplex_aio on a real grpc.aio stream over loopback, the same rules as plumbing.duplex:
a wedged stream is replaced once its hung exchange's caller has given up for STUCK_AFTER_S; a
late answer goes to its own timed-out exchange; a dropped or repeated answer breaks the stream,
never pairs an answer with another caller. And bytes that are not a valid message are refused
INVALID_ARGUMENT (unary: that call; a stream: the stream, whose pairing is lost), never UNKNOWN,
while the server goes on serving."""
import asyncio

import grpc
import pytest

import plumbing.duplex_aio as duplex_aio
from herdpb import expert_pb2, expert_pb2_grpc
from plumbing.aio import LoopThread, add_service, aio_channel, start_aio_server
from plumbing.duplex_aio import AsyncDuplex, serve_each_async
from plumbing.grpc_server import RpcFailure

HANG, DROP, REPEAT = 7, 8, 9  # layers whose messages this server hangs on, leaves unanswered, answers twice
SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertWorker"]


class _Misbehaving:
    def __init__(self):
        self.release = asyncio.Event()

    async def RunExpertsStream(self, request_iterator, context):
        while (request := await context.read()) is not grpc.aio.EOF:
            if request.layer == HANG:
                await asyncio.wait_for(self.release.wait(), 30)
            if request.layer == DROP:
                continue
            answer = expert_pb2.RunExpertsResponse(y=request.x, exchange_id=request.exchange_id)
            await context.write(answer)
            if request.layer == REPEAT:
                await context.write(answer)

    async def RunExperts(self, request, context):
        return expert_pb2.RunExpertsResponse(y=request.x)


class _Echo:
    async def RunExpertsStream(self, request_iterator, context):
        await serve_each_async(context, lambda r: expert_pb2.RunExpertsResponse(y=r.x), expert_pb2.RunExpertsResponse,
                               concurrent=True)


@pytest.fixture(scope="module")
def loop():
    return LoopThread("test-duplex-aio")


@pytest.fixture
def server(loop):
    servicer = _Misbehaving()
    server, port, _ = start_aio_server(lambda s: add_service(s, servicer, SERVICE), ["herd.v1.ExpertWorker"], loop)
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        loop.loop.call_soon_threadsafe(servicer.release.set)
        server.stop(0).wait(5)


@pytest.fixture
def stream(loop, server, monkeypatch):
    monkeypatch.setattr(duplex_aio, "STUCK_AFTER_S", 0.3)

    async def open_():
        stub = expert_pb2_grpc.ExpertWorkerStub(aio_channel(server[1]))
        return AsyncDuplex(lambda: stub.RunExpertsStream())

    d = loop.run(open_())
    try:
        yield d
    finally:
        loop.loop.call_soon_threadsafe(d.close)


def _req(layer, tag):
    req = expert_pb2.RunExpertsRequest(layer=layer)
    req.x.dtype = tag
    return req


def _result(loop, ex, timeout):
    return loop.run(ex.result(timeout))


def _send(loop, stream, *reqs):
    async def send():
        return stream.send_all(list(reqs))
    return loop.run(send())


def test_a_wedged_stream_is_replaced_after_its_caller_gave_up(loop, stream):
    assert _result(loop, _send(loop, stream, _req(1, "a")), 5)[0].y.dtype == "a"
    hung = _send(loop, stream, _req(HANG, "hung"))
    behind = _send(loop, stream, _req(1, "behind"))
    wedged = stream._call
    with pytest.raises(grpc.RpcError) as err:
        _result(loop, hung, 0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    early = _send(loop, stream, _req(1, "early"))
    assert stream._call is wedged
    loop.run(asyncio.sleep(0.4))
    fresh = _send(loop, stream, _req(1, "fresh"))
    assert stream._call is not wedged and wedged.broken is not None
    for ex in (behind, early):
        with pytest.raises(grpc.RpcError) as err:
            _result(loop, ex, 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _result(loop, fresh, 5)[0].y.dtype == "fresh"


def test_a_late_answer_goes_to_its_own_timed_out_exchange_not_the_next(loop, stream):
    first = _send(loop, stream, _req(1, "first"))
    with pytest.raises(grpc.RpcError):
        _result(loop, first, 0.0)
    second = _send(loop, stream, _req(1, "second"))
    assert _result(loop, second, 5)[0].y.dtype == "second"
    assert stream._call.broken is None


@pytest.mark.parametrize("bad", [DROP, REPEAT])
def test_a_lost_or_repeated_answer_fails_the_stream_not_another_caller(loop, stream, bad):
    first = _send(loop, stream, _req(bad, "first"))
    second = _send(loop, stream, _req(1, "second"))
    broken = stream._call
    if bad == REPEAT:
        assert _result(loop, first, 5)[0].y.dtype == "first"
    else:
        with pytest.raises(grpc.RpcError) as err:
            _result(loop, first, 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:
        _result(loop, second, 5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "message" in err.value.details()
    assert broken.broken is not None
    third = _send(loop, stream, _req(1, "third"), _req(1, "fourth"))
    assert stream._call is not broken
    assert [r.y.dtype for r in _result(loop, third, 5)] == ["third", "fourth"]
    assert [r.exchange_id for r in _result(loop, third, 5)] == [1, 2]


GARBAGE = b"\x0a\xff\xff\xff\xff\xff"  # field 1 as length-delimited, with a length that runs past the end


def test_unparseable_bytes_are_invalid_argument_and_the_server_goes_on(loop, server):
    with grpc.insecure_channel(server[1]) as ch:
        unary = ch.unary_unary("/herd.v1.ExpertWorker/RunExperts")
        with pytest.raises(grpc.RpcError) as err:
            unary(GARBAGE, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid herd.v1.RunExpertsRequest" in err.value.details()
        good = expert_pb2.RunExpertsRequest(layer=1)
        good.x.dtype = "ok"
        assert expert_pb2.RunExpertsResponse.FromString(unary(good.SerializeToString(), timeout=5)).y.dtype == "ok"


def test_an_unparseable_message_on_a_stream_closes_that_stream_only(loop):
    server, port, _ = start_aio_server(lambda s: add_service(s, _Echo(), SERVICE), ["herd.v1.ExpertWorker"], loop)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            streamed = ch.stream_stream("/herd.v1.ExpertWorker/RunExpertsStream")
            good = expert_pb2.RunExpertsRequest(layer=1, exchange_id=1)
            answers = streamed(iter([good.SerializeToString(), GARBAGE]), timeout=5)
            assert expert_pb2.RunExpertsResponse.FromString(next(answers)).exchange_id == 1
            with pytest.raises(grpc.RpcError) as err:
                next(answers)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid herd.v1.RunExpertsRequest" in err.value.details()
            other = list(streamed(iter([good.SerializeToString()]), timeout=5))  # another stream is served
            assert [expert_pb2.RunExpertsResponse.FromString(a).exchange_id for a in other] == [1]
    finally:
        server.stop(0).wait(5)


def test_closing_with_an_error_fails_what_is_in_flight_with_it(loop, stream):
    """The router closes a moved worker's stream with UNAVAILABLE, so its exchanges in flight are
    retried at the new address instead of failing CANCELLED."""
    hung = _send(loop, stream, _req(HANG, "hung"))
    loop.loop.call_soon_threadsafe(stream.close, RpcFailure(grpc.StatusCode.UNAVAILABLE, "moved"))
    with pytest.raises(grpc.RpcError) as err:
        _result(loop, hung, 5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == "moved"


def test_a_stream_that_breaks_fails_its_exchanges_unavailable_whatever_grpc_calls_it(loop, stream):
    """A SIGKILLed worker's stream can end INTERNAL ("Internal error from Core"): its exchanges in
    flight must still fail UNAVAILABLE, which the dispatcher retries on another replica or the
    restarted worker, and not fail the step."""
    hung = _send(loop, stream, _req(HANG, "hung"))
    call = stream._call
    loop.loop.call_soon_threadsafe(call.fail, duplex_aio._broken(
        RpcFailure(grpc.StatusCode.INTERNAL, "Internal error from Core")))
    with pytest.raises(grpc.RpcError) as err:
        _result(loop, hung, 5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Internal error from Core" in err.value.details()
    assert duplex_aio._broken(RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "x")).code() == \
        grpc.StatusCode.UNAUTHENTICATED  # a wrong token is not retried as if the worker were away
