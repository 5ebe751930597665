"""Sessions against a real redis-server and real attention services: versioned commits, races
with exactly one winner, loud refusals and loud save failures; KV entries written once."""
import threading
from contextlib import contextmanager

import grpc
import pytest
import redis as redis_lib
import torch

from attention_svc.kv_tier import RedisKVTier
from attention_svc.server import build, serve
from attention_svc.sessions import SessionConflict, SessionExists, SessionNotFound, SessionStore
from herd.cli import main as herd_main
from herd.client import Client
from herdpb import llama_pb2, llama_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.config import LayerKind
from llama4.engine import EntryKey
from plumbing.grpc_server import channel

MAX_TOKENS = 6
OTHER_MODEL = "ab" * 16


@pytest.fixture(scope="module")
def scout(reference_models):
    path = reference_models["tiny-scout"][1]
    return path, Checkpoint(path).fingerprint()


def tokens(n, seed):
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextmanager
def attention(path, url):
    """A real attention service (experts in-process) on a loopback port."""
    servicer, _ = build(str(path), None, torch.float32, "cpu", {}, redis_url=url)
    server, port = serve(servicer)
    try:
        yield servicer, llama_pb2_grpc.LlamaStub(channel(f"127.0.0.1:{port}")), f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def turn(session_id, ids, new_session=False):
    req = llama_pb2.GenerateRequest(session_id=session_id, new_session=new_session, ids=llama_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.ignore_eos = MAX_TOKENS, True
    return req


def stream(stub, req):
    """(token ids received, finish_reason of the final message or "", status code, details)."""
    got, reason = [], ""
    try:
        for msg in stub.Generate(req, timeout=120):
            got += msg.token_ids
            reason = msg.finish_reason or reason
    except grpc.RpcError as exc:
        return got, reason, exc.code(), exc.details()
    return got, reason, grpc.StatusCode.OK, ""


# ---- the store: compare-and-set on the version ----
@pytest.mark.parametrize("first", ["a", "b"])
def test_racing_turns_commit_exactly_one_and_lose_nothing(scout, redis_server, first):
    store = SessionStore(redis_lib.Redis.from_url(redis_server.url), scout[1])
    assert store.commit(store.read("s", new=True), [1, 2, 3], None) == 1
    read = {"a": store.read("s"), "b": store.read("s")}  # both turns read version 1
    history = {"a": [1, 2, 3, 10, 11], "b": [1, 2, 3, 20, 21]}
    second = "b" if first == "a" else "a"
    assert store.commit(read[first], history[first], None) == 2
    with pytest.raises(SessionConflict, match="changed.*retry"):
        store.commit(read[second], history[second], None)
    now = store.read("s")
    assert now.tokens == history[first] and now.version == 2  # exactly the winner's turn
    # The loser retries on the new history: both turns are kept.
    assert store.commit(now, now.tokens + history[second][3:], None) == 3
    assert store.read("s").tokens == history[first] + history[second][3:]


def test_store_refuses_missing_taken_and_vanished_sessions(scout, redis_server):
    client = redis_lib.Redis.from_url(redis_server.url)
    store = SessionStore(client, scout[1])
    with pytest.raises(SessionNotFound, match="new_session"):
        store.read("nope")
    a, b = store.read("s", new=True), store.read("s", new=True)  # two turns both start "s"
    store.commit(a, [1], None)
    with pytest.raises(SessionExists):
        store.commit(b, [2], None)
    with pytest.raises(SessionExists):
        store.read("s", new=True)
    assert store.read("s").tokens == [1]
    during = store.read("s")
    client.delete(SessionStore.key("s"))  # expired or evicted while the turn ran
    with pytest.raises(SessionConflict):
        store.commit(during, [1, 5], None)
    assert client.get(SessionStore.key("s")) is None  # not silently re-created


# ---- end to end over gRPC ----
def test_concurrent_turns_on_two_replicas_one_commits_the_other_is_aborted(scout, redis_server):
    path, fingerprint = scout
    t0, ta, tb = tokens(40, 1), tokens(9, 2), tokens(7, 3)
    with attention(path, redis_server.url) as (svc_a, stub_a, _), attention(path, redis_server.url) as (_, stub_b, _):
        got0, reason, code, _ = stream(stub_b, turn("conv", t0, new_session=True))
        assert code == grpc.StatusCode.OK and reason == "length"
        a_at_commit, b_done = threading.Event(), threading.Event()
        commit = svc_a.sessions.commit

        def commit_after_b(*args, **kwargs):  # A has read version 1 and generated; B overtakes it here
            a_at_commit.set()
            b_done.wait(60)
            return commit(*args, **kwargs)

        svc_a.sessions.commit = commit_after_b
        result = {}
        racer = threading.Thread(target=lambda: result.update(a=stream(stub_a, turn("conv", ta))))
        racer.start()
        assert a_at_commit.wait(120)
        got_b, _, code_b, _ = stream(stub_b, turn("conv", tb))
        b_done.set()
        racer.join(120)
        got_a, reason_a, code_a, details = result["a"]
        assert code_b == grpc.StatusCode.OK
        assert code_a == grpc.StatusCode.ABORTED and "changed" in details and "retry" in details
        assert reason_a == "" and len(got_a) == MAX_TOKENS - 1  # streamed tokens stay; no final message
        store = SessionStore(redis_lib.Redis.from_url(redis_server.url), fingerprint)
        after_b = t0 + got0 + tb + got_b
        assert store.read("conv").tokens == after_b and store.read("conv").version == 2
        got_retry, _, code, _ = stream(stub_a, turn("conv", ta))  # the retry continues B's history
        assert code == grpc.StatusCode.OK
        assert store.read("conv").tokens == after_b + ta + got_retry and store.read("conv").version == 3


def test_missing_taken_and_foreign_sessions_are_refused(scout, redis_server):
    path, _ = scout
    client = redis_lib.Redis.from_url(redis_server.url)
    foreign = SessionStore(client, OTHER_MODEL)
    foreign.commit(foreign.read("theirs", new=True), [1, 2, 3], None)
    ids = tokens(20, 4)
    with attention(path, redis_server.url) as (_, stub, address):
        _, _, code, details = stream(stub, turn("nope", ids))
        assert code == grpc.StatusCode.NOT_FOUND and "new_session" in details
        assert client.get(SessionStore.key("nope")) is None  # nothing was started by the refused turn
        assert stream(stub, turn("mine", ids, new_session=True))[2] == grpc.StatusCode.OK
        _, _, code, details = stream(stub, turn("mine", ids, new_session=True))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "already exists" in details
        _, _, code, details = stream(stub, turn("theirs", ids))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "another model" in details
        assert foreign.read("theirs").tokens == [1, 2, 3]  # left as it was
        _, _, code, _ = stream(stub, turn("", ids, new_session=True))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        # The client and the CLI carry new_session.
        herd = Client(address)
        msgs = list(herd.generate(ids=ids, session_id="cli", new_session=True, max_tokens=3, ignore_eos=True))
        assert msgs[-1].finish_reason == "length"
        with pytest.raises(RuntimeError, match="ALREADY_EXISTS"):
            list(herd.generate(ids=ids, session_id="cli", new_session=True, max_tokens=3))
        herd.close()


def test_cli_session_flags_are_checked(capsys):
    assert herd_main(["generate", "--prompt", "x", "--session", "c"]) == 2  # no --target: no Redis to hold it
    assert "--target" in capsys.readouterr().err
    assert herd_main(["generate", "--target", "127.0.0.1:1", "--prompt", "x", "--new-session"]) == 2
    assert "--session" in capsys.readouterr().err


def test_failed_save_ends_the_stream_with_unavailable(scout, redis_server):
    path, fingerprint = scout
    ids = tokens(30, 5)
    with attention(path, redis_server.url) as (servicer, stub, _):
        assert stream(stub, turn("conv", ids, new_session=True))[2] == grpc.StatusCode.OK
        commit = servicer.sessions.commit

        def commit_after_redis_dies(*args, **kwargs):
            redis_server.stop()
            return commit(*args, **kwargs)

        servicer.sessions.commit = commit_after_redis_dies
        got, reason, code, details = stream(stub, turn("conv", ids))
        assert code == grpc.StatusCode.UNAVAILABLE and "not saved" in details
        assert reason == "" and len(got) == MAX_TOKENS - 1
        _, _, code, _ = stream(stub, turn("conv", ids))  # and at read time, as before
        assert code == grpc.StatusCode.UNAVAILABLE


# ---- KV entries ----
def test_kv_entry_is_written_once(scout, redis_server):
    path, fingerprint = scout
    ckpt = Checkpoint(path)
    tier = RedisKVTier(redis_server.url, fingerprint, ckpt.config, torch.float32)
    kind = LayerKind.FULL
    key, other = EntryKey(b"\x01" * 32, kind, 16), EntryKey(b"\x02" * 32, kind, 16)
    first, second = torch.randn(tier.codec.shape[kind]), torch.randn(tier.codec.shape[kind])
    assert tier.put([(key, first)])
    size = tier.stats.bytes_written
    assert size == len(tier.codec.encode_entry(kind, 16, first))
    assert tier.put([(key, second), (other, second)])  # the existing key keeps its bytes; the new one is stored
    assert tier.stats.bytes_written == 2 * size
    stored = redis_lib.Redis.from_url(redis_server.url).get(RedisKVTier.key(key.block_hash, kind))
    assert stored == tier.codec.encode_entry(kind, 16, first)
    got = tier.get([key, other])
    assert torch.equal(got[0], first) and torch.equal(got[1], second)
