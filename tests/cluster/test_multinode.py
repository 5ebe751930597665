"""Expert workers across Ray nodes, started as Kubernetes starts them: `herd workers --ray-address`
against a running Ray cluster of a head and two worker nodes (separate raylets, all on 127.0.0.1,
token auth). Placement follows node resources and spreads; a node lost mid-generation changes no
token, Ray restarts its workers on the surviving node, and `herd status` shows where they went."""
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from herd.client import Client
from herd.up import own_secret
from llama4.fingerprint import fingerprint, weight_files
from llama4.store import cache_home, resolve_model
from plumbing.auth import API_KEY_FILE, API_KEYS_ENV, CLUSTER_TOKEN_ENV, CLUSTER_TOKEN_FILE
from plumbing.grpc_server import wait_serving

MODEL = "tiny-maverick"  # as the other cluster tests (tests/conftest.py)
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKERS = 2
SLOT = "expert_slot"  # the custom resource a worker asks for; each node offers room for every worker
MARK = "HERD_TEST_MULTINODE"  # every process this test starts carries it: teardown finds them all
NEW_TOKENS = 192  # long enough to be in flight when the node goes
LOOPBACK = {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}


class Proc:
    """A child process whose stdout lines are read in the background, so every wait is bounded."""

    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path, stdin=None):
        self.name, self.lines, self.log = name, queue.Queue(), log_dir / f"{name}.log"
        self.p = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=stdin, stdout=subprocess.PIPE,
                                  stderr=self.log.open("w"), text=True, start_new_session=True)
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.p.stdout], daemon=True).start()

    def expect(self, prefix: str, timeout: float) -> str:
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.p.poll() is not None and self.lines.empty():
                    break
                continue
            seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"{self.name}: no {prefix!r} within {timeout} s (exit {self.p.poll()}); stdout "
                             f"{''.join(seen)[-2000:]!r}; stderr {self.log.read_text()[-3000:]!r}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)


class RayNodes(Proc):
    """tests/cluster/ray_nodes.py: the Ray cluster, its state API and the node kill switch."""

    def __init__(self, env: dict, log_dir: Path):
        super().__init__("ray", [sys.executable, str(ROOT / "tests/cluster/ray_nodes.py"), "2",
                                 json.dumps({SLOT: WORKERS})], env, log_dir, stdin=subprocess.PIPE)
        head = json.loads(self.expect("{", 120))
        self.address, self.worker_nodes = head["address"], head["nodes"]

    def ask(self, cmd: str, **args):
        self.p.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.p.stdin.flush()
        reply = json.loads(self.expect("{", 60))
        if "error" in reply:
            raise AssertionError(f"ray_nodes {cmd}: {reply['error']}")
        return reply["ok"]

    def workers(self) -> dict[str, dict]:
        """{actor name: its state} of the ALIVE expert workers, from Ray's state API."""
        return {a["name"]: a for a in self.ask("actors") if a["name"].startswith("expert-worker-")
                and a["state"] == "ALIVE"}

    def stop(self, grace_s: float = 60.0) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()  # end of commands: the cluster shuts down
        super().stop(grace_s)


def marked(run: str) -> list[psutil.Process]:
    """Every live process this run started, however deep (Ray's nodes and the actors they start)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARK) == run:
                found.append(p)
        except psutil.Error:
            pass
    return found


def kill_marked(run: str) -> None:
    for p in marked(run):
        try:
            p.kill()
        except psutil.Error:
            pass


def listeners(pids: set[int]) -> list[str]:
    """The local addresses these processes listen on, from `ss -ltnp`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[3] for line in out.splitlines()
            if {int(part.split(",")[0]) for part in line.split("pid=")[1:]} & pids]


def wait_until(check, timeout: float, what: str):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout} s: {what}")


STATUS_LINE = re.compile(r"^\s+worker (\d+) (\S+) (SERVING|UNAVAILABLE) node ([0-9a-f]+) \((\S+)\) .* rows (\d+) ")


def herd_status(target: str, env: dict) -> dict[int, dict]:
    """`herd status` run as an operator would: {worker index: state, node id, rows}."""
    out = subprocess.run([str(BIN / "herd"), "status", "--target", target], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = [STATUS_LINE.match(line) for line in out.stdout.splitlines()]
    return {int(m[1]): {"state": m[3], "node": m[4], "rows": int(m[6])} for m in rows if m}


@pytest.fixture()
def multinode(herd_home, redis_server, tmp_path):
    """Redis, a 3-node Ray cluster, `herd workers`, the router and the attention service."""
    model = resolve_model(MODEL)
    fingerprint(model, weight_files(model), cache_home())  # once here, not in four processes at once
    run, ray_dir = secrets.token_hex(8), tempfile.mkdtemp(prefix="herd-ray-", dir="/tmp")  # short socket paths
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update({MARK: run, "HERD_HOME": str(herd_home), "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE",
                 "HERD_STATE_REDIS_URL": redis_server.url, CLUSTER_TOKEN_ENV: own_secret(CLUSTER_TOKEN_FILE)})
    # Ray's token is in the environment, never on argv; the nodes pass it (and the cluster token) to the actors.
    ray_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_urlsafe(32), "RAY_TMPDIR": ray_dir,
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"model": str(model), "workers": WORKERS, "worker_resources": {SLOT: 1},
                                      "startup_timeout_s": 120}))
    with ExitStack() as stack:
        stack.callback(lambda: subprocess.run(["rm", "-rf", ray_dir], check=False))
        stack.callback(kill_marked, run)
        # The router and the attention service serve before there are workers (readiness waits for
        # them): they load while Ray comes up.
        router = Proc("router", [sys.executable, "-m", "router_svc", "--model", str(model), "--worker-wait", "60"],
                      base, tmp_path)
        stack.callback(router.stop)
        router_address = router.expect("ROUTER_LISTENING", 120).split()[1]
        attention = Proc("attention", [sys.executable, "-m", "attention_svc", "--model", str(model), "--router",
                                       router_address, "--route-timeout", "90"],
                         {**base, "HERD_REDIS_URL": redis_server.url, API_KEYS_ENV: own_secret(API_KEY_FILE)},
                         tmp_path)
        stack.callback(attention.stop)
        ray = RayNodes(ray_env, tmp_path)
        stack.callback(ray.stop)
        workers = Proc("workers", [str(BIN / "herd"), "workers", "--config", str(config), "--ray-address",
                                   ray.address], ray_env, tmp_path)
        stack.callback(workers.stop)
        for i in range(WORKERS):
            workers.expect(f"expert-worker-{i} serving", 150)
        target = attention.expect("ATTENTION_LISTENING", 120).split()[1]
        wait_serving(router_address, 60)  # every expert has a live worker
        wait_serving(target, 60)
        yield ray, target, base, run


def test_workers_spread_over_nodes_and_a_lost_node_changes_no_token(multinode):
    ray, target, env, run = multinode
    alive = subprocess.run([str(BIN / "herd"), "workers-alive"], env=env, capture_output=True, text=True, timeout=60)
    assert alive.returncode == 0, alive.stderr  # the sidecar's liveness probe on Kubernetes
    placed = ray.workers()
    assert sorted(placed) == [f"expert-worker-{i}" for i in range(WORKERS)]
    assert {a["node_id"] for a in placed.values()} == set(ray.worker_nodes)  # one on each worker node, none on head
    addresses = listeners({p.pid for p in marked(run)})
    assert len(addresses) >= 10  # GCS, three raylets, agents, dashboard, two workers, router, attention
    assert all(a.rsplit(":", 1)[0] in LOOPBACK for a in addresses), addresses

    ids = torch.randint(3, 200000, (24,), generator=torch.Generator().manual_seed(7)).tolist()
    client = Client(target, timeout=120)
    want = [t for m in client.generate(ids=ids, max_tokens=NEW_TOKENS, ignore_eos=True) for t in m.token_ids]
    assert len(want) == NEW_TOKENS

    lost = placed["expert-worker-1"]
    (survivor,) = set(ray.worker_nodes) - {lost["node_id"]}
    got, failure = [], []

    def consume():
        try:
            for m in client.generate(ids=ids, max_tokens=NEW_TOKENS, ignore_eos=True):
                got.extend(m.token_ids)
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            failure.append(exc)

    stream = threading.Thread(target=consume, daemon=True)
    stream.start()
    wait_until(lambda: len(got) >= 4 or failure, 60, "the first tokens")
    ray.ask("kill", node=lost["node_id"])  # the raylet and every process of that node, SIGKILL
    in_flight = len(got)
    stream.join(120)
    assert not stream.is_alive() and not failure, failure
    assert in_flight < NEW_TOKENS  # the request was running when the node went
    assert got == want

    # Ray restarted the lost node's worker on the surviving one, which had room for it.
    def moved():
        now = ray.workers()
        return now if len(now) == WORKERS and all(a["node_id"] == survivor for a in now.values()) else None

    now = wait_until(moved, 60, "every worker ALIVE on the surviving node")
    assert now["expert-worker-1"]["pid"] != lost["pid"]
    assert {n["node_id"]: n["state"] for n in ray.ask("nodes")}[lost["node_id"]] == "DEAD"
    # herd status shows the new placement, and the restarted worker served the rest of the request.
    def shown():
        status = herd_status(target, env)
        on_survivor = all(w["node"] == survivor and w["state"] == "SERVING" for w in status.values())
        return status if len(status) == WORKERS and on_survivor else None

    status = wait_until(shown, 30, "herd status showing every worker SERVING on the surviving node")
    assert status[1]["rows"] > 0
    public = Client(target).status()  # an API key, not the cluster token: no internal addresses or nodes
    assert all(w.address == w.node_id == w.node_ip == "" for w in public.router.workers)
