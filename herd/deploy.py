"""The deployment config (one YAML file) and the expert placement policies.

Every field has a default that works on a laptop; a wrong value fails at start with a
message naming the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from attention_svc import DISPATCH_MODES
from llama4.config import MAX_MICRO_BATCHES, ModelConfig
from llama4.dtypes import DTYPE_NAMES
from llama4.errors import HerdInputError
from llama4.errors import need as _need
from llama4.quant import EXPERT_DTYPES
from llama4.store import DEFAULT_MODEL

PLACEMENTS = ("contiguous", "round-robin")
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")  # Ray's own: never custom resources


@dataclass
class Batching:
    max_num_seqs: int = 64  # sequences decoded together
    max_step_tokens: int = 2048  # tokens per forward step (prefill chunks + decodes)
    max_cache_tokens: int = 65536  # in-memory KV cache capacity, tokens (admission waits beyond it)
    block_size: int = 16  # tokens per KV block: the unit the Redis tier stores
    max_waiting: int = 1024  # queued requests; beyond it new ones get RESOURCE_EXHAUSTED
    max_prompt_tokens: int | None = None  # per-request prompt limit (None: the context length)
    max_new_tokens: int | None = None  # per-request max_tokens limit (None: the context length)
    # Micro-batches a step is cut into (whole sequences each) so one's remote experts overlap another's
    # dense work: an integer 1-8, or "auto" (1 on a CPU, where it was measured to lose; 2 on a GPU for big steps).
    micro_batches: int | str = "auto"


@dataclass
class DeployConfig:
    model: str = DEFAULT_MODEL  # checkpoint directory, embedded model or preset
    device: str = "cpu"
    dtype: str = "float32"  # float32 on CPU, bfloat16 on GPU
    # How expert workers hold routed experts: auto (as stored: FP8 checkpoints stay FP8), compute (the
    # compute dtype), or quantized at load: fp8, int8 (per channel), int4 (per group of 128/64/32 inputs).
    expert_dtype: str = "auto"
    workers: int = 4  # expert workers (Ray actors)
    placement: str = "contiguous"
    replicas: int = 1  # workers holding each expert: >1 survives a worker's death without waiting
    # How each MoE layer's rows reach the expert workers: "router" (through the router, which gates
    # them) or "direct" (the attention service gates them and sends each worker its rows itself,
    # with the expert-to-worker table the router pushes; the router still owns placement and health).
    dispatch: str = "router"
    # The router sends exchanges for the same layer that are at it at the same moment (from any
    # attention service) to each worker together; false: each on its own.
    coalesce: bool = True
    gpus_per_worker: float = 0.0  # Ray GPUs per expert worker: 1 on Kubernetes (one GPU pod per worker)
    # Ray custom resources per expert worker, {name: amount}: a worker starts only on a node that
    # advertises them (`ray start --resources '{"expert_slot": 4}'`), so nodes choose what they host.
    worker_resources: dict[str, float] = field(default_factory=dict)
    worker_threads: int = 1  # torch threads per expert worker
    host: str = "127.0.0.1"  # every listener binds here
    attention_port: int = 50051  # 0 = any free port
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API and /metrics; 0 = any free port, null = off
    router_port: int = 0
    router_metrics_port: int | None = 0  # Prometheus /metrics of the router; 0 = any free port, null = off
    worker_metrics_port: int | None = 0  # the same for each expert worker (published in the registry)
    dashboard: bool = True
    redis_url: str | None = None  # the KV tier's cache; None: herd starts a private redis-server (LRU)
    state_redis_url: str | None = None  # registry and sessions; None: redis_url if set, else a private one
    kv_tier: bool = True  # prefix cache and sessions in Redis
    kv_ttl_s: int = 3600  # seconds a KV block or session stays in Redis
    redis_maxmemory: str = "1gb"  # for the private redis-server (LRU eviction beyond it)
    route_timeout_s: float = 60.0
    startup_timeout_s: float = 300.0
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message cap on every hop; larger steps are split
    worker_wait_s: float | None = None  # how long the router waits for a restarting worker; None: from the model
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    auth: bool = True  # API keys on the public API and the cluster token between services
    api_keys_file: str | None = None  # one key per line; None: herd up generates one under the herd home
    tls_cert: str | None = None  # PEM certificate chain for the public listener (with tls_key)
    tls_key: str | None = None
    max_streams: int = 256  # concurrent Generate/Score calls; beyond it RESOURCE_EXHAUSTED (health never waits)
    cluster: str = "herd"
    batching: Batching = field(default_factory=Batching)

    def validate(self) -> None:
        need = functools.partial(_need, where="config")
        need(self.dtype in DTYPE_NAMES, "dtype", self.dtype, ", ".join(DTYPE_NAMES))
        need(self.expert_dtype in EXPERT_DTYPES, "expert_dtype", self.expert_dtype, ", ".join(EXPERT_DTYPES))
        need(self.device == "cpu" or self.device.startswith("cuda"), "device", self.device, "cpu or cuda[:N]")
        need(isinstance(self.workers, int) and self.workers >= 1, "workers", self.workers, "an integer >= 1")
        need(self.placement in PLACEMENTS, "placement", self.placement, list(PLACEMENTS))
        need(self.dispatch in DISPATCH_MODES, "dispatch", self.dispatch, list(DISPATCH_MODES))
        need(isinstance(self.coalesce, bool), "coalesce", self.coalesce, "true or false")
        need(isinstance(self.replicas, int) and 1 <= self.replicas <= self.workers, "replicas", self.replicas,
             f"an integer from 1 to workers={self.workers}")
        need(self.gpus_per_worker == 0 or _is_ray_amount(self.gpus_per_worker), "gpus_per_worker",
             self.gpus_per_worker, "0, a fraction in (0, 1] or a whole number")
        need(isinstance(self.worker_resources, dict) and all(
            isinstance(k, str) and k and k not in RAY_BUILTIN_RESOURCES and _is_ray_amount(v)
            for k, v in self.worker_resources.items()), "worker_resources", self.worker_resources,
             "{name: amount} of Ray custom resources, each amount in (0, 1] or a whole number "
             f"(not {', '.join(RAY_BUILTIN_RESOURCES)}: GPUs are gpus_per_worker)")
        need(self.worker_threads >= 1, "worker_threads", self.worker_threads, "an integer >= 1")
        for name in ("attention_port", "router_port", "http_port", "router_metrics_port", "worker_metrics_port"):
            v, optional = getattr(self, name), name not in ("attention_port", "router_port")
            need((v is None and optional) or (isinstance(v, int) and 0 <= v < 65536), name, v,
                 "0 (any free port) to 65535" + (", or null (off)" if optional else ""))
        need(self.route_timeout_s > 0, "route_timeout_s", self.route_timeout_s, "> 0")
        need(self.startup_timeout_s > 0, "startup_timeout_s", self.startup_timeout_s, "> 0")
        need(self.worker_wait_s is None or self.worker_wait_s > 0, "worker_wait_s", self.worker_wait_s, "null or > 0")
        need(self.drain_timeout_s >= 0, "drain_timeout_s", self.drain_timeout_s, ">= 0")
        need((self.tls_cert is None) == (self.tls_key is None), "tls_cert", self.tls_cert, "set together with tls_key")
        need(isinstance(self.max_streams, int) and self.max_streams >= 1, "max_streams", self.max_streams,
             "an integer >= 1")
        b = self.batching
        need(b.max_num_seqs >= 1, "batching.max_num_seqs", b.max_num_seqs, "an integer >= 1")
        need(b.max_step_tokens >= 1, "batching.max_step_tokens", b.max_step_tokens, "an integer >= 1")
        need(b.max_cache_tokens >= 64, "batching.max_cache_tokens", b.max_cache_tokens, "an integer >= 64")
        need(1 <= b.block_size <= b.max_cache_tokens, "batching.block_size", b.block_size, "1 to max_cache_tokens")
        need(self.kv_ttl_s >= 1, "kv_ttl_s", self.kv_ttl_s, "an integer >= 1")
        need(isinstance(self.max_message_bytes, int) and self.max_message_bytes >= 65536, "max_message_bytes",
             self.max_message_bytes, "an integer >= 65536")
        need(isinstance(b.max_waiting, int) and b.max_waiting >= 1, "batching.max_waiting", b.max_waiting,
             "an integer >= 1")
        for name in ("max_prompt_tokens", "max_new_tokens"):
            v = getattr(b, name)
            need(v is None or (isinstance(v, int) and v >= 1), f"batching.{name}", v, "null or an integer >= 1")
        need(b.micro_batches == "auto" or (type(b.micro_batches) is int and 1 <= b.micro_batches <= MAX_MICRO_BATCHES),
             "batching.micro_batches", b.micro_batches, f'"auto" or an integer from 1 to {MAX_MICRO_BATCHES}')

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> DeployConfig:
        raw = {}
        if path:
            try:
                raw = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise HerdInputError(f"config: cannot read {path}: {exc}") from None
            if not isinstance(raw, dict):
                raise HerdInputError(f"config: {path} must hold a mapping of fields")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise HerdInputError(f"config: unknown field {unknown[0]!r}; allowed: {sorted(known)}")
        batching = raw.pop("batching", None) or {}
        bad = sorted(set(batching) - {f.name for f in dataclasses.fields(Batching)})
        if bad:
            raise HerdInputError(f"config: unknown field 'batching.{bad[0]}'")
        cfg = cls(**raw, batching=Batching(**batching))
        cfg.validate()
        return cfg


def _is_ray_amount(v) -> bool:
    """An amount Ray accepts for a resource request: a fraction of one, or whole units."""
    return (isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")
            and (v <= 1 or float(v).is_integer()))


def place_experts(num_experts: int, num_workers: int, policy: str, replicas: int = 1) -> list[list[int]]:
    """Experts held by each worker: shard s goes to workers s, s+1, ..., s+replicas-1 (mod workers)."""
    if num_workers > num_experts:
        raise HerdInputError(f"config: workers={num_workers} exceeds the model's {num_experts} experts")
    if policy == "round-robin":
        shards = [list(range(w, num_experts, num_workers)) for w in range(num_workers)]
    else:
        bounds = [round(w * num_experts / num_workers) for w in range(num_workers + 1)]
        shards = [list(range(bounds[w], bounds[w + 1])) for w in range(num_workers)]
    return [sorted(e for r in range(replicas) for e in shards[(w - r) % num_workers]) for w in range(num_workers)]


SHARD_READ_BYTES_PER_S = 500e6  # a conservative read rate from shared model storage


def worker_wait_s(cfg: DeployConfig, model: ModelConfig) -> float:
    """How long the router waits for a restarting expert worker: the configured value, or the
    time to read one worker's shard of routed experts at SHARD_READ_BYTES_PER_S, plus 30 s."""
    if cfg.worker_wait_s is not None:
        return cfg.worker_wait_s
    # The compute dtype's size, even for quantized experts: a shard is read as stored and quantized on load.
    itemsize = 4 if cfg.dtype == "float32" else 2
    expert_params = len(model.moe_layers) * model.num_local_experts * 3 * model.hidden_size * model.intermediate_size
    shard = expert_params * itemsize * cfg.replicas / cfg.workers
    return 30.0 + shard / SHARD_READ_BYTES_PER_S
