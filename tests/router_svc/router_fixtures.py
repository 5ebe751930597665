"""A router over real worker servers (tests/router_svc/conftest.py's workers) through a real registry."""
import torch

from llama4.checkpoint import Checkpoint
from plumbing.registry import WorkerRegistry
from router_svc.server import RouterServicer


def router_over(path, redis_url, records, cluster, **kwargs) -> RouterServicer:
    """A router (not serving) whose registry holds `records`, its table read."""
    registry = WorkerRegistry(redis_url, cluster)
    for index, record in records.items():
        registry.publish(index, record)
    router = RouterServicer(Checkpoint(path), torch.float32, registry, **kwargs)
    router.placement.refresh()
    return router
