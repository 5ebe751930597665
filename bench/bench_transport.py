"""One message's round trip on a long-lived bidirectional gRPC stream: bare grpcio against herd's.

The message is one token of the bench model: a herd.v1.RunExpertsRequest (layer 1, expert 0,
x of 1 x 1024 float32). Each case is a server in its own process (spawned, 1 torch thread,
passive OpenMP waits, bound to 127.0.0.1) and a client in this process, which sends the message
and waits for its echo, one at a time, on one stream:
  bare sync           grpcio's sync server (a generic handler: `yield from it`) and a sync
                      stream fed from a queue, raw bytes (the message serialized once) both ways;
  bare aio            the same on grpc.aio, server and client (`await write(); await read()`);
  herd sync           herd's own code: start_server + serve_each, and a Duplex on
                      plumbing.grpc_server.channel; each exchange builds its message (write_tensor)
                      and answers come back parsed into RunExpertsResponse, as herd's callers do;
  herd sync + secret  as herd sync, with the cluster token checked on every call (auth.Guard on
                      the server, the token sent by the channel's interceptor): production's path.
The machine is noisy (2 cores), so the cases run in turn, --runs times interleaved, each run a
fresh stream with 200 warm-up round trips then --exchanges timed ones; the table gives the median
of the runs' medians, their range and the ratio to bare sync. A case is one line of CASES.
Run: .venv/bin/python -m bench.bench_transport [--runs 3] [--exchanges 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import os
import queue
import statistics
import time

import grpc

WARMUP = 200
COLS = 1024  # the bench model's hidden size: one token's row
SECRET = "bench-token"
SERVICE, METHOD = "bench.Echo", "/bench.Echo/Stream"
MAX_WORKERS = 16  # the bare servers' thread pool, as herd's start_server sizes its own
START_TIMEOUT_S = 60.0


def _message(x):
    """The message every case carries: herd's RunExpertsRequest for one token, built as herd builds it."""
    from herdpb import expert_pb2
    from plumbing.tensor_codec import write_tensor

    req = expert_pb2.RunExpertsRequest(layer=1, expert_ids=[0])
    write_tensor(req.x, x)
    return req


def _bare_handler(stream):
    """A generic handler for METHOD; no (de)serializers: grpcio passes the bytes through untouched."""
    return grpc.method_handlers_generic_handler(SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(stream)})


# Servers: each runs in its own process (_server_main), sends its port on conn and serves until told to stop.

def _bare_sync_server(conn) -> None:
    from concurrent import futures

    def echo(request_iterator, context):
        yield from request_iterator

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS))
    server.add_generic_rpc_handlers((_bare_handler(echo),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    conn.recv()
    server.stop(0).wait()


def _bare_aio_server(conn) -> None:
    async def echo(request_iterator, context):
        async for r in request_iterator:
            yield r

    async def serve():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_bare_handler(echo),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the loop stays free meanwhile
        await server.stop(0)

    asyncio.run(serve())


def _herd_server(conn, secrets: list[str] | None = None) -> None:
    from herdpb import expert_pb2, expert_pb2_grpc
    from plumbing.duplex import serve_each
    from plumbing.grpc_server import start_server

    class Echo(expert_pb2_grpc.ExpertWorkerServicer):
        def RunExpertsStream(self, request_iterator, context):
            return serve_each(request_iterator, lambda r: expert_pb2.RunExpertsResponse(y=r.x),
                              expert_pb2.RunExpertsResponse)

    server, port, _ = start_server(lambda s: expert_pb2_grpc.add_ExpertWorkerServicer_to_server(Echo(), s),
                                   ["herd.v1.ExpertWorker"], secrets=secrets, what="cluster token")
    conn.send(port)
    conn.recv()
    server.stop(0).wait()


def _herd_aio_server(conn, secrets: list[str] | None = None) -> None:
    """herd's data-path server: grpc.aio on a loop thread (plumbing.aio), serve_each_async."""
    from herdpb import expert_pb2, expert_pb2_grpc
    from plumbing.aio import LoopThread, start_aio_server
    from plumbing.duplex_aio import serve_each_async

    class Echo(expert_pb2_grpc.ExpertWorkerServicer):
        async def RunExpertsStream(self, request_iterator, context):
            await serve_each_async(context, lambda r: expert_pb2.RunExpertsResponse(y=r.x),
                                   expert_pb2.RunExpertsResponse)

    server, port, _ = start_aio_server(lambda s: expert_pb2_grpc.add_ExpertWorkerServicer_to_server(Echo(), s),
                                       ["herd.v1.ExpertWorker"], LoopThread("echo"), secrets=secrets)
    conn.send(port)
    conn.recv()
    server.stop(0).wait()


# Clients: client(address, x, count) makes one stream, runs count round trips on it one at a
# time and returns each one's seconds; the first WARMUP are the warm-up.

def _bare_sync_client(address: str, x, count: int) -> list[float]:
    payload = _message(x).SerializeToString()
    times = []
    with grpc.insecure_channel(address) as ch:
        requests: queue.Queue = queue.Queue()
        responses = ch.stream_stream(METHOD)(iter(requests.get, None))
        for _ in range(count):
            start = time.perf_counter()
            requests.put(payload)
            resp = next(responses)
            times.append(time.perf_counter() - start)
        requests.put(None)  # half-close: the server's loop ends and so does the call
        for _ in responses:
            pass
    if resp != payload:
        raise RuntimeError("bare sync: the echo is not the message sent")
    return times


def _bare_aio_client(address: str, x, count: int) -> list[float]:
    payload = _message(x).SerializeToString()

    async def run() -> tuple[list[float], bytes]:
        times = []
        async with grpc.aio.insecure_channel(address) as ch:
            call = ch.stream_stream(METHOD)()
            for _ in range(count):
                start = time.perf_counter()
                await call.write(payload)
                resp = await call.read()
                times.append(time.perf_counter() - start)
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise RuntimeError("bare aio: an answer nobody asked for")
        return times, resp

    times, resp = asyncio.run(run())
    if resp != payload:
        raise RuntimeError("bare aio: the echo is not the message sent")
    return times


def _herd_client(address: str, x, count: int, secret: str | None = None) -> list[float]:
    from herdpb import expert_pb2_grpc
    from plumbing.duplex import Duplex
    from plumbing.grpc_server import channel

    ch = channel(address, secret=secret)
    stream = Duplex(expert_pb2_grpc.ExpertWorkerStub(ch).RunExpertsStream)
    times = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            resp = stream.send_all([_message(x)]).result(30.0)[0]  # herd builds a message per exchange
            times.append(time.perf_counter() - start)
    finally:
        stream.close()
        ch.close()
    if resp.y.data != _message(x).x.data:
        raise RuntimeError("herd: the echo is not the message sent")
    return times


def _herd_aio_client(address: str, x, count: int, secret: str | None = None) -> list[float]:
    """herd's data-path client: an AsyncDuplex awaited on its own loop (as the router's dispatch)."""
    from herdpb import expert_pb2_grpc
    from plumbing.aio import aio_channel, auth_metadata
    from plumbing.duplex_aio import AsyncDuplex

    async def run():
        ch = aio_channel(address)
        stub = expert_pb2_grpc.ExpertWorkerStub(ch)
        stream = AsyncDuplex(lambda: stub.RunExpertsStream(metadata=auth_metadata(secret)))
        times = []
        try:
            for _ in range(count):
                start = time.perf_counter()
                resp = (await stream.send_all([_message(x)]).result(30.0))[0]
                times.append(time.perf_counter() - start)
        finally:
            stream.close()
            await ch.close()
        return times, resp

    times, resp = asyncio.run(run())
    if resp.y.data != _message(x).x.data:
        raise RuntimeError("herd aio: the echo is not the message sent")
    return times


# (name, server, client): the first is the yardstick of the ratios.
CASES = [
    ("bare sync", _bare_sync_server, _bare_sync_client),
    ("bare aio", _bare_aio_server, _bare_aio_client),
    ("herd sync", _herd_server, _herd_client),
    ("herd sync + secret", functools.partial(_herd_server, secrets=[SECRET]),
     functools.partial(_herd_client, secret=SECRET)),
    # The data path now: router -> worker (aio both ends), attention -> router (sync client, aio server).
    ("herd aio + secret", functools.partial(_herd_aio_server, secrets=[SECRET]),
     functools.partial(_herd_aio_client, secret=SECRET)),
    ("herd sync -> aio + secret", functools.partial(_herd_aio_server, secrets=[SECRET]),
     functools.partial(_herd_client, secret=SECRET)),
]


def _server_main(serve, conn) -> None:
    import torch

    torch.set_num_threads(1)
    serve(conn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="runs of every case, interleaved")
    ap.add_argument("--exchanges", type=int, default=2000, help="timed round trips per run (after the warm-up)")
    args = ap.parse_args()
    began = time.perf_counter()
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # as herd up runs its processes; the servers inherit it
    import torch

    torch.set_num_threads(1)
    x = torch.randn(1, COLS)
    size = _message(x).ByteSize()
    ctx = mp.get_context("spawn")
    servers = []  # (process, conn)
    medians: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    try:
        for _, serve, _ in CASES:  # all start at once; they idle while the others are measured
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_server_main, args=(serve, child), daemon=True)
            proc.start()
            servers.append((proc, conn))
        ports = []
        for (name, _, _), (_, conn) in zip(CASES, servers, strict=True):
            if not conn.poll(START_TIMEOUT_S):
                raise SystemExit(f"{name}: its server did not start within {START_TIMEOUT_S:.0f}s")
            ports.append(conn.recv())
        for run in range(args.runs):
            for (name, _, client), port in zip(CASES, ports, strict=True):
                times = client(f"127.0.0.1:{port}", x, WARMUP + args.exchanges)[WARMUP:]
                medians[name].append(statistics.median(times))
                print(f"  run {run + 1}/{args.runs}  {name:<20} {medians[name][-1] * 1e3:.3f} ms", flush=True)
    finally:
        for _, conn in servers:
            try:
                conn.send("stop")
            except OSError:  # it is gone already
                pass
        for proc, _ in servers:
            proc.join(10.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
    base = statistics.median(medians[CASES[0][0]])
    print(f"\nOne message's round trip on an open bidirectional stream, loopback, {size} bytes "
          f"(RunExpertsRequest, 1 x {COLS} float32)")
    print(f"median of {args.runs} runs' medians of {args.exchanges} round trips each (ms), their range, "
          f"and the ratio to {CASES[0][0]}")
    print(f"  {'case':<20} {'median':>7} {'range':>15} {'ratio':>6}")
    for name, _, _ in CASES:
        m = statistics.median(medians[name])
        span = f"{min(medians[name]) * 1e3:.3f}-{max(medians[name]) * 1e3:.3f}"
        print(f"  {name:<20} {m * 1e3:7.3f} {span:>15} {m / base:6.2f}")
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
