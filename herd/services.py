"""The services as one deploy config describes them, for `herd up` and for Kubernetes pods.

`herd up` spawns the router and the attention service with `service_argv`; a pod runs
`herd serve router|attention --config deploy.yaml`, which builds the same command line and
execs it, so a local cluster and a Kubernetes deployment start the same processes the same
way. Secrets reach a service through its environment: in a pod, each HERD_* secret variable
may name a mounted file as HERD_*_FILE, read here once. The model volume is filled by
`herd fill-model` (a Job) and waited for by `herd model-ready` (an init container): the
fill checks every tensor header, hashes the weights once (the sidecar every service reads)
and only then writes READY_MARKER, so a half-copied checkpoint is never served.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from herd.deploy import DeployConfig, worker_wait_s
from llama4.config import ModelConfig
from llama4.errors import HerdInputError
from llama4.store import EMBEDDED
from plumbing.auth import API_KEYS_ENV, CLUSTER_TOKEN_ENV, env_secret

SERVICES = ("router", "attention")
SECRET_ENV = ("HERD_REDIS_URL", "HERD_STATE_REDIS_URL", API_KEYS_ENV, CLUSTER_TOKEN_ENV)
READY_MARKER = "herd.ready.json"  # written last by fill-model, beside the checkpoint
HF_SOURCE = "hf:"
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]


def service_argv(name: str, cfg: DeployConfig, model_path: str, router_address: str | None = None) -> list[str]:
    """`python` arguments that start service `name` (router or attention) as cfg describes it."""
    wait = worker_wait_s(cfg, ModelConfig.from_dir(model_path))  # steps wait this long for a reloading worker
    common = ["--model", model_path, "--dtype", cfg.dtype, "--expert-dtype", cfg.expert_dtype, "--host", cfg.host,
              "--max-message-bytes", str(cfg.max_message_bytes)]
    if name == "router":
        return ["-m", "router_svc", *common, "--port", str(cfg.router_port), "--cluster", cfg.cluster,
                "--worker-wait", str(wait), *([] if cfg.coalesce else ["--no-coalesce"]),
                *([] if cfg.router_metrics_port is None else ["--metrics-port", str(cfg.router_metrics_port)])]
    if name != "attention":
        raise HerdInputError(f"service {name!r} is unknown; allowed: {', '.join(SERVICES)}")
    if not router_address:
        raise HerdInputError("attention: the router's address is needed (--router host:port)")
    return ["-m", "attention_svc", *common, "--router", router_address, "--dispatch", cfg.dispatch,
            "--device", cfg.device, "--port", str(cfg.attention_port), "--batching", json.dumps(vars(cfg.batching)),
            "--route-timeout", str(max(cfg.route_timeout_s, wait + 10)), "--kv-ttl", str(cfg.kv_ttl_s),
            "--drain", str(cfg.drain_timeout_s), "--max-streams", str(cfg.max_streams),
            *([] if cfg.http_port is None else ["--http-port", str(cfg.http_port), "--served-model-name",
                                                Path(cfg.model).name]),
            *(["--tls-cert", cfg.tls_cert, "--tls-key", cfg.tls_key] if cfg.tls_cert else []),
            *([] if cfg.kv_tier else ["--no-kv-tier"])]


def secrets_env() -> dict[str, str]:
    """Each HERD_* secret from its variable or its _FILE, for a child's environment."""
    return {name: value for name in SECRET_ENV if (value := env_secret(name))}


def serve(name: str, cfg: DeployConfig, router_address: str | None) -> None:
    """Replace this process with service `name` (a pod's main process: signals reach it directly)."""
    from llama4.store import resolve_model

    argv = service_argv(name, cfg, str(resolve_model(cfg.model)), router_address)
    env = {**os.environ, **secrets_env()}
    for name_ in SECRET_ENV:
        env.pop(name_ + "_FILE", None)
    needed = [CLUSTER_TOKEN_ENV, *([API_KEYS_ENV] if name == "attention" else [])] if cfg.auth else []
    for secret in needed:  # with auth on, a service without its secrets would serve everyone: refuse to start
        if not env.get(secret):
            raise HerdInputError(f"{name}: auth is on but {secret} (or {secret}_FILE) is not set")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def fill_model(cfg: DeployConfig, source: str | None) -> Path:
    """Put the checkpoint cfg.model names in place from `source`, check it and mark it ready.

    source: "hf:<org>/<repo>[@revision]" (the Hub; token from HF_TOKEN_PATH or HF_TOKEN), an
    embedded model's name (e.g. smollm2-moe, built from the GGUF the image ships), a local directory
    (an object store mounted into the Job), or None to check and mark what is already there."""
    dest = Path(cfg.model)
    (dest / READY_MARKER).unlink(missing_ok=True)
    if source is None:
        pass
    elif source.startswith(HF_SOURCE):
        from huggingface_hub import snapshot_download

        repo, _, revision = source[len(HF_SOURCE):].partition("@")
        snapshot_download(repo, revision=revision or None, local_dir=dest, allow_patterns=HF_PATTERNS)
    elif source in EMBEDDED:
        EMBEDDED[source](dest)
    elif Path(source).is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True)
    else:
        raise HerdInputError(f"--source={source!r} is not hf:<org>/<repo>, an embedded model "
                             f"({', '.join(sorted(EMBEDDED))}) or a directory")
    return mark_ready(dest)


def mark_ready(path: Path) -> Path:
    """Check a checkpoint (config, every tensor header, the experts' layout), hash it, then mark it."""
    from llama4.checkpoint import Checkpoint

    if not (path / "config.json").exists():
        raise HerdInputError(f"{path}: no config.json: not a Hugging Face checkpoint")
    ckpt = Checkpoint(path)
    ckpt.check_experts()
    record = {"fingerprint": ckpt.fingerprint(), "marked_at": time.time()}
    tmp = path / f".{READY_MARKER}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path / READY_MARKER)
    return path


def wait_model_ready(cfg: DeployConfig, wait_s: float, poll_s: float = 5.0) -> dict:
    """The ready marker's record once the model volume holds a checked checkpoint; HerdInputError after wait_s."""
    marker = Path(cfg.model) / READY_MARKER
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return json.loads(marker.read_text())
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                raise HerdInputError(f"{cfg.model} is not ready after {wait_s:.0f} s: no {READY_MARKER} "
                                     "(run the model-fill Job, or `herd fill-model` once)") from None
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.01)))
