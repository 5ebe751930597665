"""The Ray actor that hosts one expert worker's gRPC server.

Named `expert-worker-<i>` in the herd namespace so the Ray dashboard shows each worker;
`max_restarts=-1` makes Ray bring a killed worker back, and the new process publishes
its new address to the registry, where the router picks it up. Its load (rows, compute time,
resident expert bytes) goes to Ray's own metrics (`ray.util.metrics`, shown by the dashboard
and Ray's Prometheus export) and to its Prometheus endpoint; its repr names its experts.
"""
from __future__ import annotations

import ipaddress
import os
import threading

import ray

RAY_METRICS_EVERY_S = 2.0


@ray.remote(max_restarts=-1, max_task_retries=0)
class ExpertWorker:
    def __init__(self, index: int, experts: list[int], model_path: str, dtype: str, device: str,
                 cluster: str, host: str = "127.0.0.1", threads: int = 1,
                 max_message_bytes: int = 64 * 1024 * 1024, expert_dtype: str = "auto",
                 metrics_port: int | None = 0):
        import torch

        from expert_svc.server import serve
        from llama4.dtypes import torch_dtype
        from llama4.errors import HerdInputError
        from plumbing.auth import CLUSTER_TOKEN_ENV, env_secret
        from plumbing.metrics_http import serve_metrics
        from plumbing.registry import STATE_REDIS_URL_ENV, WorkerRegistry

        torch.set_num_threads(threads)
        self.index, self.experts, self.error, self.expert_dtype = index, experts, None, expert_dtype
        self.metrics_address = None
        # Where Ray placed this process: after a node is lost, `herd status` shows the new placement.
        self.node_id, self.node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        try:
            # The cluster token comes from the environment Ray started this process with (the variable, or
            # the file its _FILE names, as on Kubernetes), not an argument (the Ray dashboard shows those).
            token = env_secret(CLUSTER_TOKEN_ENV)
            # So does the registry's URL, which carries the state Redis' password.
            redis_url = env_secret(STATE_REDIS_URL_ENV)
            if not redis_url:
                raise HerdInputError(f"{STATE_REDIS_URL_ENV} (or {STATE_REDIS_URL_ENV}_FILE) is not set in the "
                                     "environment of this Ray node: the worker cannot register")
            self.server, port, self.servicer = serve(model_path, experts, torch_dtype(dtype), device, host=host,
                                                     max_message_bytes=max_message_bytes, token=token,
                                                     expert_dtype=expert_dtype)
            # Bound to every interface (Kubernetes): publish the node's address, not 0.0.0.0.
            advertised = self.node_ip if ipaddress.ip_address(host).is_unspecified else host
            self.address = f"{advertised}:{port}"
            if metrics_port is not None:
                self.metrics_address = f"{advertised}:{serve_metrics(self.servicer.metrics, host, metrics_port)}"
        except HerdInputError as exc:  # a bad checkpoint or setting: a restart cannot help; info() reports it
            print(f"expert-worker-{index}: {exc}", flush=True)
            self.error = str(exc)
            return
        except Exception as exc:  # a worker that cannot serve must not look alive: Ray restarts it
            print(f"expert-worker-{index}: failed to start: {exc!r}", flush=True)
            os._exit(1)
        # Registration is not a condition of serving: the heartbeat publishes as soon as Redis answers.
        record = {"address": self.address, "experts": experts, "pid": os.getpid(), "metrics": self.metrics_address,
                  "node_id": self.node_id, "node_ip": self.node_ip,
                  "fingerprint": self.servicer.fingerprint, "expert_bytes": self.servicer.expert_bytes}
        self._stop = threading.Event()
        WorkerRegistry(redis_url, cluster).heartbeat(index, record, self._stop)
        threading.Thread(target=self._export_to_ray, name="ray-metrics", daemon=True).start()

    def _export_to_ray(self) -> None:
        """Ray custom metrics, updated from the servicer's counts every RAY_METRICS_EVERY_S (not per call)."""
        from ray.util.metrics import Counter, Gauge

        tags = {"worker": str(self.index)}
        rows = Counter("herd_expert_rows", description="Rows this worker's experts computed.", tag_keys=("worker",))
        seconds = Counter("herd_expert_compute_seconds", description="Seconds in the expert FFN.",
                          tag_keys=("worker",))
        held = Gauge("herd_expert_resident_bytes", description="Routed-expert bytes held, by storage dtype.",
                     tag_keys=("worker", "dtype"))
        experts = Gauge("herd_experts_held", description="Experts this worker holds.", tag_keys=("worker",))
        sent_rows, sent_seconds = 0, 0.0
        while not self._stop.is_set():
            sv = self.servicer
            now_rows, now_seconds = sv.rows_served, sv.compute_seconds
            if now_rows > sent_rows:
                rows.inc(now_rows - sent_rows, tags=tags)
            if now_seconds > sent_seconds:
                seconds.inc(now_seconds - sent_seconds, tags=tags)
            sent_rows, sent_seconds = now_rows, now_seconds
            for dtype, n in sv.expert_bytes.items():
                held.set(n, tags={**tags, "dtype": dtype})
            experts.set(len(self.experts), tags=tags)
            self._stop.wait(RAY_METRICS_EVERY_S)

    def __repr__(self) -> str:  # what the Ray dashboard shows for the actor
        from plumbing.registry import expert_span

        held = f"experts {expert_span(self.experts)}, {self.expert_dtype}"
        if self.error:
            held = "failed: " + self.error[:80]
        return f"ExpertWorker({self.index}: {held})"

    def info(self) -> dict:
        if self.error:
            return {"index": self.index, "error": self.error}
        sv = self.servicer
        return {"index": self.index, "experts": self.experts, "address": self.address, "pid": os.getpid(),
                "node_id": self.node_id, "node_ip": self.node_ip, "metrics": self.metrics_address,
                "rows_served": sv.rows_served,
                "compute_seconds": sv.compute_seconds, "expert_bytes": sv.expert_bytes}

