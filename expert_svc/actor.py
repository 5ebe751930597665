"""The Ray actor that hosts one expert worker's gRPC server.

Named `expert-worker-<i>` in the herd namespace so the Ray dashboard shows each worker;
`max_restarts=-1` makes Ray bring a killed worker back, and the new process publishes
its new address to the registry, where the router picks it up.
"""
from __future__ import annotations

import ipaddress
import os
import threading

import ray


@ray.remote(max_restarts=-1, max_task_retries=0)
class ExpertWorker:
    def __init__(self, index: int, experts: list[int], model_path: str, dtype: str, device: str,
                 redis_url: str, cluster: str, host: str = "127.0.0.1", threads: int = 1,
                 max_message_bytes: int = 64 * 1024 * 1024, expert_dtype: str = "auto"):
        import torch

        from expert_svc.server import serve
        from llama4.dtypes import torch_dtype
        from llama4.errors import HerdInputError
        from plumbing.auth import CLUSTER_TOKEN_ENV
        from plumbing.registry import WorkerRegistry

        torch.set_num_threads(threads)
        self.index, self.experts, self.error = index, experts, None
        try:
            # The cluster token comes from the environment Ray started this process with, not an argument
            # (actor arguments are shown on the Ray dashboard).
            token = os.environ.get(CLUSTER_TOKEN_ENV) or None
            self.server, port, self.servicer = serve(model_path, experts, torch_dtype(dtype), device, host=host,
                                                     max_message_bytes=max_message_bytes, token=token,
                                                     expert_dtype=expert_dtype)
            # Bound to every interface (Kubernetes): publish the node's address, not 0.0.0.0.
            advertised = ray.util.get_node_ip_address() if ipaddress.ip_address(host).is_unspecified else host
            self.address = f"{advertised}:{port}"
        except HerdInputError as exc:  # a bad checkpoint or setting: a restart cannot help; info() reports it
            print(f"expert-worker-{index}: {exc}", flush=True)
            self.error = str(exc)
            return
        except Exception as exc:  # a worker that cannot serve must not look alive: Ray restarts it
            print(f"expert-worker-{index}: failed to start: {exc!r}", flush=True)
            os._exit(1)
        # Registration is not a condition of serving: the heartbeat publishes as soon as Redis answers.
        record = {"address": self.address, "experts": experts, "pid": os.getpid(),
                  "fingerprint": self.servicer.fingerprint, "expert_bytes": self.servicer.expert_bytes}
        self._stop = threading.Event()
        WorkerRegistry(redis_url, cluster).heartbeat(index, record, self._stop)

    def info(self) -> dict:
        if self.error:
            return {"index": self.index, "error": self.error}
        return {"index": self.index, "experts": self.experts, "address": self.address, "pid": os.getpid(),
                "rows_served": self.servicer.rows_served, "expert_bytes": self.servicer.expert_bytes}
