"""Shared by the router's tests: real expert worker servers on loopback whose RunExperts a test
wraps (to record or hold what they are sent), and a router over them through a real registry.
(Not a conftest.py: tests import `conftest` by name for the root one's constants.)"""
import contextlib

import torch

from expert_svc.server import serve as serve_worker
from llama4.checkpoint import Checkpoint
from llama4.weights import load_experts, load_gates
from plumbing.registry import WorkerRegistry
from router_svc.server import RouterServicer


@contextlib.contextmanager
def worker_servers(path, expert_sets, wrap):
    """{index: registry record}: one worker server per expert set, its servicer.run replaced by
    wrap(index, run); the servers stop when the block ends."""
    servers, records = [], {}
    try:
        for index, experts in enumerate(expert_sets):
            server, port, servicer = serve_worker(str(path), experts, torch.float32, "cpu")
            servers.append(server)
            servicer.run = wrap(index, servicer.run)
            records[index] = {"address": f"127.0.0.1:{port}", "experts": experts,
                              "fingerprint": servicer.fingerprint}
        yield records
    finally:
        for server in servers:
            server.stop(0)


def reference_layer(path, layer: int):
    """(gate [E, H], w13, w2) of MoE layer `layer`, every expert: what the answers are checked against."""
    ckpt = Checkpoint(path)
    w13, w2 = load_experts(ckpt, list(range(ckpt.config.num_local_experts)), torch.float32, "cpu")[layer]
    return load_gates(ckpt, torch.float32, "cpu")[layer], w13, w2


def router_over(path, redis_url, records, cluster, **kwargs) -> RouterServicer:
    """A router (not serving) whose registry holds `records`, its table read."""
    registry = WorkerRegistry(redis_url, cluster)
    for index, record in records.items():
        registry.publish(index, record)
    router = RouterServicer(Checkpoint(path), torch.float32, registry, **kwargs)
    router.placement.refresh()
    return router
