"""One Route exchange at batch 1, broken into transport, router Python, worker Python and compute;
then the same exchange in dispatch: direct (no router hop).

A router and one expert worker (experts 0-31 of bench-maverick, as one of 4 workers holds them)
run in their own processes on loopback, as `herd up` runs them (1 torch thread each, passive
OpenMP waits); this process plays the attention service on a long-lived RouteStream and sends
one token at a time, cycling through the MoE layers with tokens whose expert that worker holds.
Per exchange: total (as the caller sees it), router Python (its Route minus the wait for the
worker), worker Python (its RunExperts minus the expert FFN), compute (the expert FFN);
transport is the rest: gRPC, protobuf and thread hand-offs on both hops. Its floor is measured
after, in the same run: the round trip of the same message to a server that only echoes it.
Run: .venv/bin/python -m bench.bench_exchange [--exchanges 300] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import multiprocessing as mp
import os
import pstats
import statistics
import time

NUM_EXPERTS_HELD = 32
LAYER_CYCLE = 4  # tokens per layer kept, so the worker reads weights from memory as in decode


class _Profile:
    """cProfile of the calls it wraps, on whichever server thread runs them, while `on`."""

    def __init__(self, enabled: bool):
        self.profiler = cProfile.Profile() if enabled else None
        self.on = False

    def report(self) -> str:
        if self.profiler is None:
            return ""
        out = io.StringIO()
        pstats.Stats(self.profiler, stream=out).sort_stats("tottime").print_stats(22)
        return out.getvalue()


def _timed(fn, samples: list, profile: _Profile | None = None):
    def wrapper(*args, **kwargs):
        profiling = profile is not None and profile.on and profile.profiler is not None
        if profiling:
            profile.profiler.enable()
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            samples.append((time.perf_counter() - start, time.thread_time() - cpu))
            if profiling:
                profile.profiler.disable()
    return wrapper


def _timed_async(fn, samples: list, profile: _Profile | None = None):
    """_timed for a coroutine function (the router's loop runs one exchange at a time here)."""
    async def wrapper(*args, **kwargs):
        profiling = profile is not None and profile.on and profile.profiler is not None
        if profiling:
            profile.profiler.enable()
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return await fn(*args, **kwargs)
        finally:
            samples.append((time.perf_counter() - start, time.thread_time() - cpu))
            if profiling:
                profile.profiler.disable()
    return wrapper


def _serve_commands(conn, samples: dict[str, list], profile: _Profile) -> None:
    while True:
        cmd = conn.recv()
        if cmd == "reset":
            for s in samples.values():
                s.clear()
            profile.on = True
            conn.send("ok")
        elif cmd == "stats":
            profile.on = False
            conn.send(({k: list(v) for k, v in samples.items()}, profile.report()))
        else:
            return


def _worker_main(model_path: str, redis_url: str, conn, profile: bool) -> None:
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(levelname)s %(message)s")

    import expert_svc.server as worker_server
    from plumbing.registry import WorkerRegistry

    torch.set_num_threads(1)
    samples, prof = {"run": [], "compute": []}, _Profile(profile)
    worker_server.grouped_expert_ffn = _timed(worker_server.grouped_expert_ffn, samples["compute"])
    server, port, servicer = worker_server.serve(model_path, list(range(NUM_EXPERTS_HELD)), torch.float32, "cpu")
    servicer.run = _timed(servicer.run, samples["run"], prof)
    WorkerRegistry(redis_url).publish(0, {"address": f"127.0.0.1:{port}", "experts": list(range(NUM_EXPERTS_HELD)),
                                          "fingerprint": servicer.fingerprint})
    conn.send("ready")
    _serve_commands(conn, samples, prof)
    server.stop(0)


def _router_main(model_path: str, redis_url: str, conn, profile: bool) -> None:
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s router %(levelname)s %(message)s")

    import router_svc.dispatch as dispatch
    from llama4.checkpoint import Checkpoint
    from plumbing.registry import WorkerRegistry
    from router_svc.server import RouterServicer, start

    torch.set_num_threads(1)
    samples, prof = {"route": [], "wait": []}, _Profile(profile)
    # the router's wait for its worker's answer
    dispatch._answered_or_overdue = _timed_async(dispatch._answered_or_overdue, samples["wait"])
    servicer = RouterServicer(Checkpoint(model_path), torch.float32, WorkerRegistry(redis_url))
    servicer.placement.refresh()
    servicer.route_async = _timed_async(servicer.route_async, samples["route"], prof)
    server, port, _ = start(servicer)
    conn.send(port)
    _serve_commands(conn, samples, prof)
    server.stop(0)


def _echo_main(conn) -> None:
    """A bare stream server answering each request with its own rows: the transport floor."""
    from herdpb import expert_pb2, expert_pb2_grpc
    from plumbing.duplex import serve_each
    from plumbing.grpc_server import start_server

    class Echo(expert_pb2_grpc.ExpertWorkerServicer):
        def RunExpertsStream(self, request_iterator, context):
            return serve_each(request_iterator, lambda r: expert_pb2.RunExpertsResponse(y=r.x),
                              expert_pb2.RunExpertsResponse)

    server, port, _ = start_server(lambda s: expert_pb2_grpc.add_ExpertWorkerServicer_to_server(Echo(), s),
                                   ["herd.v1.ExpertWorker"])
    conn.send(port)
    conn.recv()
    server.stop(0)


def _direct(model_path: str, redis_url: str, tokens, exchanges: int, wconn, worker_pid: int):
    """dispatch: direct from this process, as an attention service runs it: a Dispatcher on its own
    loop over the registry's placement, called from this (the engine's) thread. Returns (totals,
    this process's samples, the worker's samples)."""
    import psutil
    import torch

    import router_svc.dispatch as dispatch
    from llama4.checkpoint import Checkpoint
    from llama4.weights import load_gates
    from plumbing.aio import LoopThread
    from plumbing.registry import WorkerRegistry
    from router_svc.placement import Placement

    ckpt = Checkpoint(model_path)
    samples = {"route": [], "wait": []}
    dispatch._answered_or_overdue = _timed_async(dispatch._answered_or_overdue, samples["wait"])
    placement = Placement(WorkerRegistry(redis_url), ckpt.config.num_local_experts, 64 << 20)
    placement.refresh()
    dispatcher = dispatch.Dispatcher(load_gates(ckpt, torch.float32, "cpu"), placement, ckpt.config.hidden_size,
                                     torch.float32)
    dispatcher.route = _timed_async(dispatcher.route, samples["route"])
    loop = LoopThread("direct")

    def exchange(layer, x):
        return loop.run(dispatcher.route(layer, x, time.monotonic() + 30.0))

    for i in range(50):
        exchange(*tokens[i % len(tokens)])
    for s in samples.values():
        s.clear()
    wconn.send("reset")
    wconn.recv()
    procs = {"attention (this)": psutil.Process(), "worker": psutil.Process(worker_pid)}
    cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    totals = []
    for i in range(exchanges):
        start = time.perf_counter()
        exchange(*tokens[i % len(tokens)])
        totals.append(time.perf_counter() - start)
    cpu = {name: (sum(p.cpu_times()[:2]) - cpu_before[name]) / exchanges for name, p in procs.items()}
    wconn.send("stats")
    w, _ = wconn.recv()
    return totals, samples, w, cpu


def _tokens(model_path: str):
    """[(layer, x [1, H])]: tokens whose top-1 expert is one the worker holds, LAYER_CYCLE per MoE layer."""
    import torch

    from kernels import route_top1
    from llama4.checkpoint import Checkpoint
    from llama4.weights import load_gates

    gates = load_gates(Checkpoint(model_path), torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    held = {}
    for layer, gate in gates.items():
        x = torch.randn(256, gate.shape[1], generator=gen)
        ids, _ = route_top1(x, gate)
        held[layer] = x[ids < NUM_EXPERTS_HELD][:LAYER_CYCLE]
    return [(layer, held[layer][j : j + 1]) for j in range(LAYER_CYCLE) for layer in sorted(held)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exchanges", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="cProfile the router and the worker (slows both)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as herd up runs its processes
    import psutil
    import torch

    from herd.redis_server import RedisServer
    from herdpb import router_pb2, router_pb2_grpc
    from llama4.store import resolve_model
    from plumbing.duplex import Duplex
    from plumbing.grpc_server import channel
    from plumbing.tensor_codec import write_tensor

    torch.set_num_threads(1)
    path = str(resolve_model("bench-maverick"))
    redis = RedisServer(policy="noeviction")
    ctx = mp.get_context("spawn")
    wconn, wchild = ctx.Pipe()
    rconn, rchild = ctx.Pipe()
    worker = ctx.Process(target=_worker_main, args=(path, redis.url, wchild, args.profile), daemon=True)
    worker.start()
    try:
        if wconn.recv() != "ready":
            raise SystemExit("worker failed to start")
        router = ctx.Process(target=_router_main, args=(path, redis.url, rchild, args.profile), daemon=True)
        router.start()
        port = rconn.recv()
        tokens = _tokens(path)
        stream = Duplex(router_pb2_grpc.RouterStub(channel(f"127.0.0.1:{port}")).RouteStream)

        def exchange(layer, x):
            req = router_pb2.RouteRequest(layer=layer)
            write_tensor(req.x, x)
            return stream.send_all([req]).result(30.0)[0]

        for i in range(50):  # warm-up: streams open, weights touched
            exchange(*tokens[i % len(tokens)])
        for conn in (wconn, rconn):
            conn.send("reset")
            conn.recv()
        procs = {"attention (this)": psutil.Process(), "router": psutil.Process(router.pid),
                 "worker": psutil.Process(worker.pid)}
        cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
        totals = []
        for i in range(args.exchanges):
            start = time.perf_counter()
            exchange(*tokens[i % len(tokens)])
            totals.append(time.perf_counter() - start)
        # Every thread of each process (gRPC's own included), per exchange.
        cpu = {name: (sum(p.cpu_times()[:2]) - cpu_before[name]) / args.exchanges for name, p in procs.items()}
        wconn.send("stats")
        w, wprof = wconn.recv()
        rconn.send("stats")
        r, rprof = rconn.recv()
        rconn.send("stop")
        stream.close()
        direct = _direct(path, redis.url, tokens, args.exchanges, wconn, worker.pid)
        wconn.send("stop")
        econn, echild = ctx.Pipe()
        echo = ctx.Process(target=_echo_main, args=(echild,), daemon=True)
        echo.start()
        from herdpb import expert_pb2, expert_pb2_grpc
        bare = Duplex(expert_pb2_grpc.ExpertWorkerStub(channel(f"127.0.0.1:{econn.recv()}")).RunExpertsStream)
        floor = []
        for i in range(50 + args.exchanges):
            req = expert_pb2.RunExpertsRequest(layer=1, expert_ids=[0])
            write_tensor(req.x, tokens[i % len(tokens)][1])
            start = time.perf_counter()
            bare.send_all([req]).result(30.0)
            floor.append(time.perf_counter() - start)
        floor = floor[50:]
        bare.close()
        econn.send("stop")
    finally:
        redis.stop()
    n = min(len(totals), len(r["route"]), len(w["run"]))
    rows = []
    fixed = {"router": [totals[i] - w["compute"][i][0] for i in range(n)]}
    for k, how in enumerate(("wall", "CPU")):  # CPU: the handler thread's own time, blind to waiting for a core
        router_py = [r["route"][i][k] - r["wait"][i][k] for i in range(n)]
        worker_py = [w["run"][i][k] - w["compute"][i][k] for i in range(n)]
        compute = [w["compute"][i][k] for i in range(n)]
        if how == "wall":
            transport = [totals[i] - router_py[i] - w["run"][i][0] for i in range(n)]
            rows.append((how, totals, transport, router_py, worker_py, compute))
        else:
            rows.append((how, None, None, router_py, worker_py, compute))
    ms = lambda v: f"{statistics.median(v) * 1e3:6.3f}" if v else "     -"  # noqa: E731
    print(f"\nOne Route exchange, batch 1, bench-maverick fp32, median of {n} (ms)")
    print(f"  {'':<8} {'total':>7} {'transport':>10} {'router Py':>10} {'worker Py':>10} {'compute':>8}")
    for how, total, transport, router_py, worker_py, compute in rows:
        print(f"  {how:<8} {ms(total):>7} {ms(transport):>10} {ms(router_py):>10} {ms(worker_py):>10} {ms(compute):>8}")
    print("  transport: gRPC, protobuf and thread hand-offs on both hops (wall time less the three others)")
    print(f"  floor: one hop on a bare stream (an echo server, same message) {ms(floor).strip()} ms, "
          f"so {2 * statistics.median(floor) * 1e3:.3f} ms for two")
    print("  process CPU per exchange, every thread (ms): "
          + ", ".join(f"{name} {seconds * 1e3:.3f}" for name, seconds in cpu.items()))
    totals, d, w, direct_cpu = direct
    n = min(len(totals), len(d["route"]), len(w["run"]))
    dispatch_py = [d["route"][i][0] - d["wait"][i][0] for i in range(n)]
    worker_py = [w["run"][i][0] - w["compute"][i][0] for i in range(n)]
    transport = [totals[i] - dispatch_py[i] - w["run"][i][0] for i in range(n)]
    fixed["direct"] = [totals[i] - w["compute"][i][0] for i in range(n)]
    print(f"\nThe same exchange in dispatch: direct (this process gates and sends to the worker), median of {n} (ms)")
    print(f"  {'':<8} {'total':>7} {'transport':>10} {'dispatch Py':>11} {'worker Py':>10} {'compute':>8}")
    print(f"  {'wall':<8} {ms(totals):>7} {ms(transport):>10} {ms(dispatch_py):>11} {ms(worker_py):>10} "
          f"{ms([w['compute'][i][0] for i in range(n)]):>8}")
    print("  process CPU per exchange, every thread (ms): "
          + ", ".join(f"{name} {seconds * 1e3:.3f}" for name, seconds in direct_cpu.items()))
    print("  dispatch Py: the gate and the dispatch on this process's loop, less the wait for the worker; "
          "transport includes\n  the hand-off from the calling thread to that loop and back")
    print("\nFixed cost per exchange (total less expert compute), median (ms): "
          + ", ".join(f"{mode} {ms(v).strip()}" for mode, v in fixed.items()))
    if args.profile:
        print("\nrouter profile (tottime)\n" + rprof + "\nworker profile (tottime)\n" + wprof)


if __name__ == "__main__":
    main()
