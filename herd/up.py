"""`herd up`: the whole local cluster, started in order and stopped together.

Two Redis servers (private unless configured: an LRU cache for the KV tier, and a
never-evicting one for state, the worker registry and sessions) -> a local Ray cluster bound
to 127.0.0.1 with token auth -> one ExpertWorker actor per shard, the router and the
attention service (loading side by side). Each is waited on until it reports SERVING. Children are supervised: one
that dies is restarted on the same port with backoff, and herd up says so; Ray restarts
expert workers itself.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from herd.deploy import DeployConfig, place_experts
from herd.redis_server import RedisServer
from herd.services import service_argv
from llama4.config import ModelConfig
from llama4.errors import HerdInputError
from llama4.fingerprint import fingerprint, weight_files
from llama4.progress import progress
from llama4.store import cache_home, resolve_model
from plumbing.auth import API_KEY_FILE, API_KEYS_ENV, CLUSTER_TOKEN_ENV, CLUSTER_TOKEN_FILE, read_secrets
from plumbing.grpc_server import wait_serving
from plumbing.registry import STATE_REDIS_URL_ENV, WorkerRegistry, expert_span

STAGES = ("model and redis", "ray", "expert workers", "router", "attention")
CLUSTER_FILE = "cluster.json"  # under the herd home: the endpoints of the cluster herd up runs
RAY_START_ATTEMPTS = 3
RAY_TOKEN_FILE = "ray-auth-token"  # under the herd home: the Ray dashboard's and the ray CLI's token
_PORT_FLAGS = {"HTTP": "--http-port", "METRICS": "--metrics-port"}  # extra listeners a service announces

ROOT = Path(__file__).resolve().parent.parent


def own_secret(name: str) -> str:
    """A secret kept in a 0600 file under the herd home, made on first use."""
    path = cache_home() / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another herd up made it just now
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def write_secret(name: str, value: str) -> Path:
    """Replace the 0600 file `name` under the herd home with `value` (never readable by others, even briefly)."""
    path = cache_home() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(tmp, path)
    return path


class Cluster:
    def __init__(self, cfg: DeployConfig, log=print):
        self.cfg, self.log = cfg, log
        self.redis: RedisServer | None = None  # private KV tier cache (LRU)
        self.state_redis: RedisServer | None = None  # private state: worker registry, sessions (never evicted)
        self.procs: dict[str, subprocess.Popen] = {}
        self._specs: dict[str, tuple[list[str], dict, str]] = {}  # name -> (argv, env, ready line) to restart
        self._restarts: dict[str, tuple[int, float]] = {}  # name -> (restarts so far, when the next may run)
        self.actors = []
        self.ray_started = False
        self.ray_metrics_port = self.ray_token_file = None
        self.attention_address = self.router_address = self.dashboard_url = None
        self.endpoints: dict[str, dict[str, str]] = {}  # service -> {"HTTP" | "METRICS": address}
        self.api_key_hint = ""  # where a client finds its API key
        self.api_key = self.cluster_token = None  # with auth: the public API's key, the internal services' token

    @property
    def http_address(self) -> str | None:
        """The OpenAI-compatible HTTP API (and the attention service's /metrics)."""
        return self.endpoints.get("attention", {}).get("HTTP")

    @property
    def router_metrics_address(self) -> str | None:
        return self.endpoints.get("router", {}).get("METRICS")

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
        with progress(desc="herd up", total=len(STAGES), unit="stage") as bar:
            self._start_stages(cfg, lambda: (bar.set_postfix_str(STAGES[bar.n]), bar.update()))

    def _start_stages(self, cfg: DeployConfig, stage) -> None:
        """Start everything; stage() marks each of STAGES done. What does not depend on another
        part starts beside it: the model is built (first run only) while Ray starts, and the router
        and the attention service load while Ray and the expert workers start (each waits for its
        peers)."""
        pool = ThreadPoolExecutor(2, thread_name_prefix="herd-up")
        failed, started = threading.Event(), None
        try:
            model = pool.submit(resolve_model, cfg.model)
            if cfg.redis_url:
                redis_url = cfg.redis_url
            else:
                self.redis = RedisServer(cfg.host, maxmemory=cfg.redis_maxmemory)
                redis_url = self.redis.url
            if cfg.state_redis_url or cfg.redis_url:
                state_url = cfg.state_redis_url or cfg.redis_url
            else:
                self.state_redis = RedisServer(cfg.host, maxmemory="0", policy="noeviction")
                state_url = self.state_redis.url
            checked = model.done()
            if checked:  # a checkpoint already there: check it before starting anything else
                self._check_model(cfg, model.result())
            secrets_env = self._secrets()
            # Ray's processes (the expert workers) inherit the cluster token and the registry's URL;
            # the API keys go to the attention service alone (no other service takes them).
            services_env = {**secrets_env, API_KEYS_ENV: ""}
            os.environ.update({**services_env, STATE_REDIS_URL_ENV: state_url})
            env = {**os.environ, **services_env, "HERD_REDIS_URL": redis_url, "HERD_STATE_REDIS_URL": state_url,
                   "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

            def services() -> None:  # they need the model, not Ray: they load while Ray starts
                path = str(model.result())
                if not checked:
                    self._check_model(cfg, path)
                if not failed.is_set():
                    self.router_address = self._spawn("router", service_argv("router", cfg, path), env,
                                                      "ROUTER_LISTENING")
                if not failed.is_set():
                    self.attention_address = self._spawn("attention", service_argv("attention", cfg, path,
                                                                                   self.router_address),
                                                         {**env, **secrets_env}, "ATTENTION_LISTENING")

            started = pool.submit(services)
            self._start_ray()
            model_path = str(model.result())
            stage()
            stage()
            self.actors, infos = start_expert_workers(cfg, model_path, state_url)
            started.result()
        except BaseException:  # stop() runs next: what the services thread spawns must be in self.procs by then
            failed.set()
            if started is not None:
                wait([started], timeout=cfg.startup_timeout_s)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        stage()
        shards_text = ", ".join(f"{i['address']} experts {expert_span(i['experts'])}" for i in infos)
        self.log(f"expert workers: {len(infos)} ({shards_text})")
        wait_serving(self.router_address, cfg.startup_timeout_s)
        self._wait_router_knows(infos)
        stage()
        tls_ca = Path(cfg.tls_cert).read_bytes() if cfg.tls_cert else None
        wait_serving(self.attention_address.replace("127.0.0.1", "localhost") if tls_ca else self.attention_address,
                     cfg.startup_timeout_s, tls_ca)
        stage()
        # Where everything is, for `herd status` (no secrets: the token file is named, not copied).
        (cache_home() / CLUSTER_FILE).write_text(json.dumps({
            "attention": self.attention_address, "http": self.http_address, "router": self.router_address,
            "router_metrics": self.router_metrics_address, "ray_dashboard": self.dashboard_url,
            "ray_token_file": str(self.ray_token_file) if self.ray_token_file else None,
            "workers": [{"index": i["index"], "address": i["address"], "metrics": i.get("metrics")} for i in infos]}))

    def _wait_router_knows(self, infos: list[dict]) -> None:
        """Until the router's table holds every worker at the address it serves on: the router
        started beside the workers and is ready once every expert has one live holder, which with
        replicas can be before all of them registered."""
        from herdpb import router_pb2, router_pb2_grpc
        from plumbing.grpc_server import channel

        want = {i["index"]: i["address"] for i in infos}
        ch = channel(self.router_address, secret=self.cluster_token)
        try:
            stub, deadline = router_pb2_grpc.RouterStub(ch), time.monotonic() + self.cfg.startup_timeout_s
            while True:
                known = {w.index: w.address for w in stub.Status(router_pb2.RouterStatusRequest(), timeout=10).workers
                         if w.healthy and not w.refused}
                if all(known.get(index) == address for index, address in want.items()):
                    return
                if time.monotonic() > deadline:
                    unknown = [i for i, address in sorted(want.items()) if known.get(i) != address]
                    raise RuntimeError(f"the router does not know expert workers {unknown} at their addresses "
                                       f"within {self.cfg.startup_timeout_s:.0f} s")
                time.sleep(0.1)
        finally:
            ch.close()

    @staticmethod
    def _check_model(cfg: DeployConfig, model_path) -> None:
        """The placement fits the model; its weights are hashed once, here, before the services
        start: they all read the cached digests instead of each hashing every byte at once."""
        place_experts(ModelConfig.from_dir(model_path).num_local_experts, cfg.workers, cfg.placement, cfg.replicas)
        fingerprint(Path(model_path), weight_files(Path(model_path)), cache_home())

    def _start_ray(self) -> None:
        ray_environment()
        import ray

        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            try:
                ctx = ray.init(namespace="herd", include_dashboard=self.cfg.dashboard, dashboard_host=self.cfg.host,
                               logging_level="ERROR", log_to_driver=False, configure_logging=False)
                break
            except Exception as exc:  # Ray gives its raylet a fixed 30 s to register, too little on a loaded machine
                # A failed start leaves no node for ray.shutdown() to stop: what it started is found as our children.
                procs = _ray_children()
                ray.shutdown(wait_for_processes=True)
                _reap(procs, terminate=True)
                # Ray's fixed start-up waits (the raylet registering, the GCS writing its port file)
                # run out on a loaded machine: those are retried, anything else is an error.
                if not any(slow in str(exc) for slow in ("timed out during startup", "Timed out waiting for file")):
                    raise RuntimeError(f"the local Ray cluster did not start: {exc}") from None
                if attempt == RAY_START_ATTEMPTS:
                    raise RuntimeError(f"the local Ray cluster did not start ({attempt} attempts): it did not "
                                       f"come up within Ray's fixed start-up waits ({exc})") from None
                self.log(f"herd: the local Ray did not come up within its fixed start-up waits; starting it "
                         f"again (attempt {attempt + 1} of {RAY_START_ATTEMPTS})")
        self.ray_started = True
        self.dashboard_url = ctx.dashboard_url
        self.ray_metrics_port = ctx.address_info.get("metrics_export_port")
        # The dashboard asks its operator for this token: a file only they can read, never argv or a log.
        self.ray_token_file = write_secret(RAY_TOKEN_FILE, os.environ["RAY_AUTH_TOKEN"])

    def _secrets(self) -> dict[str, str]:
        """The API keys and the cluster token, for the children's environment (never argv).
        Without a configured key file, both are generated once into 0600 files under the herd
        home, where `herd generate/score/status` find them (API_KEY_FILE, CLUSTER_TOKEN_FILE)."""
        if not self.cfg.auth:
            return {API_KEYS_ENV: "", CLUSTER_TOKEN_ENV: ""}
        keys = read_secrets(API_KEYS_ENV, self.cfg.api_keys_file) if self.cfg.api_keys_file else [
            own_secret(API_KEY_FILE)]
        self.api_key_hint = self.cfg.api_keys_file or str(cache_home() / API_KEY_FILE)
        self.api_key, self.cluster_token = keys[0], own_secret(CLUSTER_TOKEN_FILE)
        return {API_KEYS_ENV: ",".join(keys), CLUSTER_TOKEN_ENV: self.cluster_token}

    def _spawn(self, name: str, args: list[str], env: dict, ready: str) -> str:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=None, text=True,
                                cwd=ROOT, start_new_session=True)  # Ctrl-C reaches herd up alone; it stops them
        self.procs[name] = proc
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        for line in proc.stdout:
            if line.startswith(ready):
                words = line.split()
                address = words[1]
                extra = dict(zip(words[2::2], words[3::2], strict=True))  # {"HTTP": addr, "METRICS": addr}
                # A restart binds the same ports: its clients (and Prometheus) keep their addresses.
                argv = list(args)
                argv[argv.index("--port") + 1] = address.rsplit(":", 1)[1]
                for key, addr in extra.items():
                    argv[argv.index(_PORT_FLAGS[key]) + 1] = addr.rsplit(":", 1)[1]
                self.endpoints[name] = extra
                self._specs[name] = (argv, env, ready)
                return address
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"{name} service exited before listening (code {proc.poll()})")

    # ---- watch, restart and stop ----
    def _redis_named(self, name: str) -> RedisServer:
        return self.redis if name == "redis" else self.state_redis

    def dead_children(self) -> list[str]:
        dead = [name for name, p in self.procs.items() if p.poll() is not None]
        for name in ("redis", "state redis"):
            server = self._redis_named(name)
            if server is not None and server.proc.poll() is not None:
                dead.append(name)
        return dead

    def supervise(self) -> list[str]:
        """Restart every process herd up started that died, with exponential backoff (1 s to 30 s);
        returns what it did, one line each, for the operator."""
        said = []
        for name in self.dead_children():
            count, not_before = self._restarts.get(name, (0, 0.0))
            if time.monotonic() < not_before:
                continue
            code = (self.procs[name] if name in self.procs else self._redis_named(name).proc).poll()
            try:
                if name in self.procs:
                    argv, env, ready = self._specs[name]
                    self._spawn(name, argv, env, ready)
                elif name == "redis":
                    self.redis = self.redis.restarted()  # empty, same port and password: clients reconnect
                else:
                    self.state_redis = self.state_redis.restarted()
                said.append(f"herd: {name} exited (code {code}); restarted (restart {count + 1})")
                self._restarts[name] = (count + 1, time.monotonic() + min(2**count, 30))
            except (RuntimeError, OSError) as exc:
                said.append(f"herd: {name} exited (code {code}); restart failed ({exc}); retrying")
                self._restarts[name] = (count + 1, time.monotonic() + min(2**count, 30))
        return said

    def worker_pids(self) -> list[int]:
        import ray

        return [info["pid"] for info in ray.get([a.info.remote() for a in self.actors], timeout=30)]

    def stop(self) -> None:
        """Stop everything herd up started: the attention service first (it drains its requests
        within drain_timeout_s), then the router, the workers, Ray and Redis."""
        for _name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self.cfg.drain_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()
        if self.ray_started:
            import ray

            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
            procs = _ray_children()  # found while they run: the workers go with their raylet
            ray.shutdown(wait_for_processes=True)
            _reap(procs)  # gone, workers included, before anything else starts its own
            self.ray_started = False
        for server in (self.redis, self.state_redis):
            if server:
                server.stop()
        self.redis = self.state_redis = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ray_environment() -> None:
    """The environment the local Ray is started with; Ray reads its auth settings when first
    imported, so this comes before `import ray`."""
    # Local-only mode (every Ray listener on 127.0.0.1) and token auth with a fresh token.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_urlsafe(32))
    # Several torch processes share the cores: OpenMP threads that spin after each op steal
    # them from each other (measured: cluster decode at batch 8 went from 0.6x to 0.87x).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Ray runs its workers at nice 15; the expert workers are on every step's critical path, so they
    # must not yield the cores to the attention service and the router (one machine shares them).
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _ray_children() -> list:
    """This process's descendants that run Ray's code: what ray.init started (its GCS, raylet,
    dashboard, agents) and their children (Ray's workers, the expert workers among them)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if f"{os.sep}ray{os.sep}" in cmd or cmd.startswith("ray::"):
            found.append(proc)
    return found


def _reap(procs: list, timeout_s: float = 15.0, terminate: bool = False) -> None:
    """Wait for these processes to exit (asked to with SIGTERM first if terminate); kill what is
    left after timeout_s."""
    import psutil

    for proc in procs if terminate else ():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    if alive:
        raise RuntimeError(f"Ray processes {[p.pid for p in alive]} outlived SIGKILL")


def start_expert_workers(cfg: DeployConfig, model_path: str, redis_url: str):
    """One ExpertWorker actor per shard on the connected Ray cluster; waits until each serves.

    redis_url is the registry's, for clearing it here; the workers find it in their Ray node's
    environment (HERD_STATE_REDIS_URL or its _FILE), never in their arguments, which Ray's
    dashboard and state API show.

    Used by `herd up` (local Ray) and `herd workers` (an existing Ray cluster, e.g. KubeRay).
    A worker asks Ray for gpus_per_worker GPUs and the worker_resources custom resources (no
    CPUs: worker_threads sizes its torch pool); SPREAD puts the workers on as many nodes as have
    room, so losing a node loses as few shards as possible, and Ray restarts each on a node with room."""
    import ray

    from expert_svc.actor import ExpertWorker

    shards = place_experts(ModelConfig.from_dir(model_path).num_local_experts, cfg.workers, cfg.placement, cfg.replicas)
    WorkerRegistry(redis_url, cfg.cluster).clear()
    actors = []
    for i, experts in enumerate(shards):
        opts = dict(name=f"expert-worker-{i}", namespace="herd", num_cpus=0, num_gpus=cfg.gpus_per_worker,
                    resources=dict(cfg.worker_resources), scheduling_strategy="SPREAD")
        actors.append(ExpertWorker.options(**opts).remote(
            i, experts, model_path, cfg.dtype, cfg.device, cfg.cluster, cfg.host, cfg.worker_threads,
            cfg.max_message_bytes, cfg.expert_dtype, cfg.worker_metrics_port))
    try:
        infos = ray.get([a.info.remote() for a in actors], timeout=cfg.startup_timeout_s)
    except ray.exceptions.GetTimeoutError:  # most often: no node offers what a worker asks for
        raise RuntimeError(f"expert workers not started within {cfg.startup_timeout_s:.0f} s; each needs "
                           f"num_gpus={cfg.gpus_per_worker} and resources={cfg.worker_resources}: do the Ray nodes "
                           f"have room for {len(actors)}?") from None
    for info in infos:
        if info.get("error"):
            raise HerdInputError(f"expert-worker-{info['index']}: {info['error']}")
    for info in infos:
        wait_serving(info["address"], cfg.startup_timeout_s)
    return actors, infos

