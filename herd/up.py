"""`herd up`: the whole local cluster, started in order and stopped together.

Redis (private unless configured) -> a local Ray cluster bound to 127.0.0.1 with token
auth -> one ExpertWorker actor per shard -> the router -> the attention service. Each is
waited on until it reports SERVING. Children are watched: if the router or the attention
service dies, the cluster stops loudly instead of serving half a model.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from herd.deploy import DeployConfig, place_experts
from herd.redis_server import RedisServer
from llama4.config import ModelConfig
from llama4.store import resolve_model
from plumbing.grpc_server import wait_serving
from plumbing.registry import WorkerRegistry

ROOT = Path(__file__).resolve().parent.parent


class Cluster:
    def __init__(self, cfg: DeployConfig, log=print):
        self.cfg, self.log = cfg, log
        self.redis: RedisServer | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.actors = []
        self.ray_started = False
        self.attention_address = self.router_address = self.dashboard_url = None

    # ---- start ----
    def start(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.cfg
        model_path = str(resolve_model(cfg.model))
        ckpt_cfg = ModelConfig.from_dir(model_path)
        # fail before starting anything
        place_experts(ckpt_cfg.num_local_experts, cfg.workers, cfg.placement, cfg.replicas)
        if cfg.redis_url:
            redis_url = cfg.redis_url
        else:
            self.redis = RedisServer(cfg.host, maxmemory=cfg.redis_maxmemory)
            redis_url = self.redis.url
        self._start_ray()
        self.actors, infos = start_expert_workers(cfg, model_path, redis_url)
        shards_text = ", ".join(f"{i['address']} experts {_span(i['experts'])}" for i in infos)
        self.log(f"expert workers: {len(infos)} ({shards_text})")

        env = {**os.environ, "HERD_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
        self.router_address = self._spawn("router", [
            "-m", "router_svc", "--model", model_path, "--dtype", cfg.dtype, "--host", cfg.host,
            "--port", str(cfg.router_port), "--cluster", cfg.cluster,
            "--max-message-bytes", str(cfg.max_message_bytes)], env, "ROUTER_LISTENING")
        wait_serving(self.router_address, cfg.startup_timeout_s)
        batching = json.dumps(vars(cfg.batching))
        self.attention_address = self._spawn("attention", [
            "-m", "attention_svc", "--model", model_path, "--router", self.router_address, "--dtype", cfg.dtype,
            "--device", cfg.device, "--host", cfg.host, "--port", str(cfg.attention_port), "--batching", batching,
            "--route-timeout", str(cfg.route_timeout_s), "--kv-ttl", str(cfg.kv_ttl_s),
            "--max-message-bytes", str(cfg.max_message_bytes),
            *([] if cfg.kv_tier else ["--no-kv-tier"])], env, "ATTENTION_LISTENING")
        wait_serving(self.attention_address, cfg.startup_timeout_s)

    def _start_ray(self) -> None:
        # Local-only mode (every Ray listener on 127.0.0.1) and token auth with a fresh token.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_urlsafe(32))
        # Several torch processes share the cores: OpenMP threads that spin after each op steal
        # them from each other (measured: cluster decode at batch 8 went from 0.6x to 0.87x).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        import ray

        ctx = ray.init(namespace="herd", include_dashboard=self.cfg.dashboard, dashboard_host=self.cfg.host,
                       logging_level="ERROR", log_to_driver=False, configure_logging=False)
        self.ray_started = True
        self.dashboard_url = ctx.dashboard_url

    def _spawn(self, name: str, args: list[str], env: dict, ready: str) -> str:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=None, text=True,
                                cwd=ROOT)
        self.procs[name] = proc
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        for line in proc.stdout:
            if line.startswith(ready):
                return line.split()[1]
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"{name} service exited before listening (code {proc.poll()})")

    # ---- watch and stop ----
    def dead_children(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def worker_pids(self) -> list[int]:
        import ray

        return [info["pid"] for info in ray.get([a.info.remote() for a in self.actors], timeout=30)]

    def stop(self) -> None:
        for _name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        if self.ray_started:
            import ray

            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
            ray.shutdown()
            self.ray_started = False
        if self.redis:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_expert_workers(cfg: DeployConfig, model_path: str, redis_url: str):
    """One ExpertWorker actor per shard on the connected Ray cluster; waits until each serves.

    Used by `herd up` (local Ray) and `herd workers` (an existing Ray cluster, e.g. KubeRay)."""
    import ray

    from expert_svc.actor import ExpertWorker

    shards = place_experts(ModelConfig.from_dir(model_path).num_local_experts, cfg.workers, cfg.placement, cfg.replicas)
    WorkerRegistry(redis_url, cfg.cluster).clear()
    actors = []
    for i, experts in enumerate(shards):
        opts = dict(name=f"expert-worker-{i}", namespace="herd", num_cpus=0, num_gpus=cfg.gpus_per_worker)
        actors.append(ExpertWorker.options(**opts).remote(
            i, experts, model_path, cfg.dtype, cfg.device, redis_url, cfg.cluster, cfg.host, cfg.worker_threads,
            cfg.max_message_bytes))
    infos = ray.get([a.info.remote() for a in actors], timeout=cfg.startup_timeout_s)
    for info in infos:
        wait_serving(info["address"], cfg.startup_timeout_s)
    return actors, infos


def _span(experts: list[int]) -> str:
    if experts == list(range(experts[0], experts[-1] + 1)):
        return f"{experts[0]}-{experts[-1]}"
    return ",".join(map(str, experts))
