"""The services as Kubernetes runs them: `herd serve`, `herd fill-model`, `herd model-ready`, secrets as files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herd.deploy import DeployConfig
from herd.services import READY_MARKER, fill_model, service_argv, wait_model_ready
from llama4.checkpoint import Checkpoint
from llama4.errors import HerdInputError
from llama4.store import write_random_checkpoint
from plumbing.auth import env_secret, read_secrets

ROOT = Path(__file__).resolve().parents[2]
HERD = [sys.executable, "-m", "herd"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_checkpoint("tiny-maverick", tmp_path_factory.mktemp("src") / "tiny-maverick")


def config(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(json.dumps({"host": "127.0.0.1", **fields}))
    return path


def test_service_argv_carries_the_config(tiny):
    cfg = DeployConfig(model=str(tiny), dtype="float32", expert_dtype="int8", router_port=5555, router_metrics_port=9,
                       attention_port=6666, http_port=None, kv_tier=False)
    router = service_argv("router", cfg, str(tiny))
    assert router[:2] == ["-m", "router_svc"]
    assert router[router.index("--port") + 1] == "5555" and router[router.index("--expert-dtype") + 1] == "int8"
    assert "--no-coalesce" not in router
    assert "--no-coalesce" in service_argv("router", DeployConfig(model=str(tiny), coalesce=False), str(tiny))
    attention = service_argv("attention", cfg, str(tiny), "router:50052")
    assert attention[attention.index("--router") + 1] == "router:50052" and "--no-kv-tier" in attention
    assert attention[attention.index("--dispatch") + 1] == "router"
    direct = service_argv("attention", DeployConfig(model=str(tiny), dispatch="direct"), str(tiny), "router:50052")
    assert direct[direct.index("--dispatch") + 1] == "direct"
    assert "--http-port" not in attention
    with pytest.raises(HerdInputError, match="router's address"):
        service_argv("attention", cfg, str(tiny))
    with pytest.raises(HerdInputError, match="unknown"):
        service_argv("experts", cfg, str(tiny))


def test_secrets_can_be_files_and_a_missing_file_names_the_variable_not_the_contents(tmp_path, monkeypatch):
    secret = tmp_path / "token"
    secret.write_text("s3cret-value\n")
    monkeypatch.delenv("HERD_TEST_TOKEN", raising=False)
    monkeypatch.setenv("HERD_TEST_TOKEN_FILE", str(secret))
    assert env_secret("HERD_TEST_TOKEN") == "s3cret-value"
    monkeypatch.setenv("HERD_TEST_TOKEN", "from-env")  # the variable itself wins
    assert env_secret("HERD_TEST_TOKEN") == "from-env"
    keys = tmp_path / "keys"
    keys.write_text("k1\nk2, k3\n")
    monkeypatch.setenv("HERD_TEST_KEYS_FILE", str(keys))
    assert read_secrets("HERD_TEST_KEYS") == ["k1", "k2", "k3"]
    monkeypatch.delenv("HERD_TEST_TOKEN")
    monkeypatch.setenv("HERD_TEST_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(OSError, match="HERD_TEST_TOKEN_FILE=.*absent"):
        env_secret("HERD_TEST_TOKEN")


def test_fill_model_checks_hashes_and_marks_a_copied_checkpoint(tiny, tmp_path):
    cfg = DeployConfig(model=str(tmp_path / "models" / "tiny"))
    with pytest.raises(HerdInputError, match="not ready"):
        wait_model_ready(cfg, 0.3, poll_s=0.1)
    fill_model(cfg, str(tiny))
    record = wait_model_ready(cfg, 0)
    assert record["fingerprint"] == Checkpoint(tiny).fingerprint()
    assert (Path(cfg.model) / "herd.fingerprint.json").exists()  # hashed once, for every pod to read


def test_fill_model_refuses_a_broken_checkpoint_and_leaves_it_unmarked(tiny, tmp_path):
    dest = tmp_path / "models" / "tiny"
    cfg = DeployConfig(model=str(dest))
    fill_model(cfg, str(tiny))
    shard = next(dest.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(Exception):  # noqa: B017 - whichever check trips first, it must not be marked
        fill_model(cfg, None)
    assert not (dest / READY_MARKER).exists()
    with pytest.raises(HerdInputError, match="--source"):
        fill_model(cfg, "s3-bucket-name")


def test_cli_fill_model_builds_the_embedded_model_and_model_ready_waits(tmp_path, herd_home):
    cfg = config(tmp_path, model=str(tmp_path / "models" / "smollm2-moe"))
    env = {**os.environ, "HERD_HOME": str(herd_home), "PYTHONPATH": str(ROOT)}
    waited = subprocess.run([*HERD, "model-ready", "--config", str(cfg), "--wait", "0.2"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert waited.returncode == 2 and "run the model-fill Job" in waited.stderr
    filled = subprocess.run([*HERD, "fill-model", "--config", str(cfg), "--source", "smollm2-moe"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert filled.returncode == 0, filled.stderr
    ready = subprocess.run([*HERD, "model-ready", "--config", str(cfg), "--wait", "5"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert ready.returncode == 0 and "fingerprint" in ready.stdout
    assert (tmp_path / "models" / "smollm2-moe" / "config.json").exists()


def test_serve_router_from_secret_files_is_alive_but_unready_without_workers(tiny, tmp_path, redis_server):
    """The pod's router: secrets from files, serving at once; ready only when every expert has a worker."""
    (tmp_path / "state-url").write_text(redis_server.url)
    (tmp_path / "cluster-token").write_text("cluster-secret")
    cfg = config(tmp_path, model=str(tiny), router_port=0, router_metrics_port=None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    env.update(PYTHONPATH=str(ROOT), HERD_HOME=str(tmp_path / "home"),
               HERD_STATE_REDIS_URL_FILE=str(tmp_path / "state-url"),
               HERD_CLUSTER_TOKEN_FILE=str(tmp_path / "cluster-token"))
    proc = subprocess.Popen([*HERD, "serve", "router", "--config", str(cfg)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ROUTER_LISTENING 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        address = line.split()[1]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert "cluster-secret" not in cmdline and redis_server.password not in cmdline
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = lambda service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            time.sleep(1.5)  # a probe round of the placement watch
            assert check("liveness") == health_pb2.HealthCheckResponse.SERVING
            assert check("") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.poll() is None  # waiting for workers is not a reason to exit
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_workers_alive_reads_the_heartbeat_of_herd_workers(tmp_path):
    env = {**os.environ, "HERD_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    probe = lambda: subprocess.run([*HERD, "workers-alive", "--max-age", "30"], env=env, capture_output=True,
                                   text=True, timeout=60)
    missing = probe()
    assert missing.returncode == 1 and "is `herd workers` running" in missing.stderr
    beat = tmp_path / "workers.heartbeat"
    beat.touch()
    assert probe().returncode == 0
    os.utime(beat, (time.time() - 120, time.time() - 120))  # a loop that stopped turning two minutes ago
    stale = probe()
    assert stale.returncode == 1 and "last beat" in stale.stderr


def test_serve_refuses_to_start_without_its_secrets_when_auth_is_on(tiny, tmp_path):
    cfg = config(tmp_path, model=str(tiny))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    env.update(PYTHONPATH=str(ROOT), HERD_HOME=str(tmp_path / "home"), HERD_STATE_REDIS_URL="redis://127.0.0.1:1/0")
    out = subprocess.run([*HERD, "serve", "router", "--config", str(cfg)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "HERD_CLUSTER_TOKEN" in out.stderr
    env["HERD_CLUSTER_TOKEN"] = "t"
    out = subprocess.run([*HERD, "serve", "attention", "--config", str(cfg), "--router", "127.0.0.1:1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "HERD_API_KEYS" in out.stderr
