"""The router refuses expert workers that serve another model (real Redis, real worker server)."""
import json
import shutil

import torch

from expert_svc.server import serve as serve_worker
from herd.redis_server import RedisServer
from llama4.checkpoint import Checkpoint
from plumbing.registry import WorkerRegistry
from router_svc.server import RouterServicer


def test_a_worker_with_another_checkpoint_is_refused_naming_both_fingerprints(reference_models, tmp_path):
    path = reference_models["tiny-maverick"][1]
    other = tmp_path / "other"
    shutil.copytree(path, other)
    raw = bytearray((other / "model.safetensors").read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    lo, hi = json.loads(raw[8 : 8 + header_len])["model.layers.3.feed_forward.experts.gate_up_proj"]["data_offsets"]
    at = 8 + header_len + (lo + hi) // 2 // 4 * 4
    raw[at : at + 4] = torch.tensor([7.0]).numpy().tobytes()
    (other / "model.safetensors").write_bytes(bytes(raw))
    redis = RedisServer(policy="noeviction")
    worker, port, servicer = serve_worker(str(other), list(range(128)), torch.float32, "cpu")
    try:
        registry = WorkerRegistry(redis.url)
        registry.publish(0, {"address": f"127.0.0.1:{port}", "experts": list(range(128)),
                             "fingerprint": servicer.fingerprint})
        router = RouterServicer(Checkpoint(path), torch.float32, registry)
        router.placement.refresh()
        ours, theirs = Checkpoint(path).fingerprint(), servicer.fingerprint
        assert ours != theirs
        status = router.Status(None, None)
        refused = [w for w in status.workers if w.refused]
        assert len(refused) == 1 and ours in refused[0].refused and theirs in refused[0].refused
        assert router.placement.missing_experts() == list(range(128))  # none of its experts are used
        assert status.fingerprint == ours
    finally:
        worker.stop(0)
        redis.stop()
