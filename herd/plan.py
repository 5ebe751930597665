"""`herd plan`: will a model fit, and on how many expert workers? Arithmetic from the config alone.

Bytes per expert follow the banks herd actually holds (kernels.quant: FP8 and int8 with one
scale per output row, int4 with a bf16 scale and zero per group of inputs). Each GPU keeps
RESERVE_BYTES for the CUDA context, torch's allocator and activations. An attention replica holds
every dense weight (embeddings, attention, shared experts, dense FFNs, lm_head) and the KV cache;
the router holds the gates. Start-up budgets are the time to read what each process loads
from shared model storage at a stated rate, twice over, plus a fixed minute (Python, CUDA,
quantizing at load). Nothing here reads weights, so it runs on a laptop for any checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from llama4.config import ModelConfig
from llama4.errors import HerdInputError
from llama4.presets import PRESETS, preset
from llama4.quant import int4_group

GIB, GB = 2**30, 10**9
GPUS = {"h100-80gb": 80, "h200-141gb": 141, "a100-80gb": 80, "a100-40gb": 40, "l40s-48gb": 48, "b200-192gb": 192}
RESERVE_BYTES = 3 * GIB  # per GPU: CUDA context, allocator slack, activations of a step
EXPERT_DTYPES = ("bf16", "fp32", "fp8", "int8", "int4", "int4-g64", "int4-g32")
KV_ENTRY_HEADER = 54  # bytes of each Redis KV entry's header (attention_svc.kv_entry)
BLOCK_SIZE = 16  # tokens per KV block, the tier's unit (batching.block_size's default)
READ_GBPS = 0.25  # GB/s one pod reads from a shared (NFS-like) volume: a per-client figure to plan with
STARTUP_FIXED_S = 60.0


@dataclass
class Plan:
    model: str
    gpu: str
    expert_dtype: str
    gpu_bytes: int
    expert_params: int  # routed expert parameters of the whole model
    bytes_per_expert: int  # one expert of one MoE layer, as held
    workers: int  # the expert workers this plan is for
    experts_per_worker: int
    worker_bytes: int  # experts + reserve, per worker
    min_workers: int  # the fewest workers whose largest shard fits (0: none does)
    workers_fit: bool
    attention_weight_bytes: int
    kv_bytes_per_sequence: int  # at the target context
    attention_bytes: int  # weights + KV for the target batch + reserve
    kv_capacity_tokens: int  # tokens of target-context sequences the attention GPU can cache
    attention_fits: bool
    redis_bytes: int  # for the target prefix volume in the KV tier
    fits: bool  # the cluster: every expert worker and an attention replica, each on its own GPU
    one_gpu_bytes: int  # everything on one GPU (the monolithic model): weights, all experts, KV, reserve
    fits_one_gpu: bool
    worker_read_bytes: int  # what one expert worker reads at start: its experts as stored
    worker_startup_s: int  # start-up budget of one expert worker at read_gbps
    attention_startup_s: int  # start-up budget of one attention replica (its dense weights) at read_gbps
    read_gbps: float


def load_config(model: str) -> ModelConfig:
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelConfig.from_dir(path)
    if model in PRESETS:
        return preset(model)
    raise HerdInputError(f"--model={model!r} is neither a checkpoint directory nor a preset; "
                         f"presets: {sorted(PRESETS)}")


def expert_bytes(cfg: ModelConfig, expert_dtype: str) -> int:
    """Bytes of one expert of one MoE layer: gate_up [2I, H] and down [H, I], as kernels.quant holds them."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    params, rows = 3 * h * i, 2 * i + h  # rows: output channels of both matrices
    if expert_dtype in ("bf16", "fp32"):
        return params * (2 if expert_dtype == "bf16" else 4)
    if expert_dtype == "fp8":
        return params + rows * 4  # fp32 scale per output row
    if expert_dtype == "int8":
        return params + rows * 2  # bf16 scale per output row (the packed kernel's)
    group = int4_group(expert_dtype)
    groups = 2 * i * (h // group) + h * (i // group)
    return params // 2 + groups * 4  # bf16 scale and zero per group


def kv_bytes_per_sequence(cfg: ModelConfig, context: int, itemsize: int) -> int:
    """Chunked (RoPE) layers keep at most one attention chunk of KV; global layers keep all of it."""
    per_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
    total = 0
    for layer in range(cfg.num_hidden_layers):
        kept = min(context, cfg.attention_chunk_size) if cfg.is_chunked(layer) else context
        total += kept * per_token_layer
    return total


def plan(model: str, gpu: str, expert_dtype: str, workers: int | None = None, replicas: int = 1,
         context: int = 8192, batch: int = 16, prefix_tokens: int = 1_000_000, dtype: str = "bf16",
         read_gbps: float = READ_GBPS) -> Plan:
    if gpu not in GPUS:
        raise HerdInputError(f"--gpu={gpu!r} is not known; allowed: {', '.join(GPUS)}")
    if expert_dtype not in EXPERT_DTYPES:
        raise HerdInputError(f"--expert-dtype={expert_dtype!r} is not supported; allowed: {', '.join(EXPERT_DTYPES)}")
    for name, value in (("context", context), ("batch", batch), ("replicas", replicas)):
        if value < 1:
            raise HerdInputError(f"--{name}={value} is invalid; allowed: an integer >= 1")
    if not read_gbps > 0:
        raise HerdInputError(f"--read-gbps={read_gbps} is invalid; allowed: a number > 0")
    cfg = load_config(model)
    itemsize = {"bf16": 2, "fp32": 4}.get(dtype)
    if itemsize is None:
        raise HerdInputError(f"--dtype={dtype!r} is invalid; allowed: bf16, fp32")
    gpu_bytes = GPUS[gpu] * GB
    e, moe = cfg.num_local_experts, len(cfg.moe_layers)
    per_expert = expert_bytes(cfg, expert_dtype)

    def worker_bytes(n: int) -> tuple[int, int]:
        held = math.ceil(e * replicas / n)
        return held, held * moe * per_expert + RESERVE_BYTES

    min_workers = next((n for n in range(max(replicas, 1), e + 1) if worker_bytes(n)[1] <= gpu_bytes), 0)
    n = workers or min_workers or e
    if not 1 <= n <= e or n < replicas:
        raise HerdInputError(f"--workers={n} is invalid; allowed: {replicas} to {e} (the model's experts)")
    held, per_worker = worker_bytes(n)

    total, _ = cfg.param_counts()
    expert_params = e * moe * 3 * cfg.hidden_size * cfg.intermediate_size
    gates = e * moe * cfg.hidden_size
    weights = (total - expert_params - gates) * itemsize
    kv_seq = kv_bytes_per_sequence(cfg, context, itemsize)
    attention = weights + batch * kv_seq + RESERVE_BYTES
    free = gpu_bytes - weights - RESERVE_BYTES
    capacity = max(free, 0) // kv_seq * context
    kinds = len({cfg.layer_kind(layer) for layer in range(cfg.num_hidden_layers)})  # one entry per block per kind
    tier_per_token = kv_bytes_per_sequence(cfg, 1, itemsize) + KV_ENTRY_HEADER * kinds / BLOCK_SIZE
    fits_workers, fits_attention = per_worker <= gpu_bytes, attention <= gpu_bytes
    one_gpu = attention + e * moe * per_expert
    # Experts are read as stored: FP8 as FP8 (Meta's release), anything else from bf16 and quantized on load.
    stored = expert_bytes(cfg, "fp8" if expert_dtype == "fp8" else "bf16")
    read = held * moe * stored
    budget = lambda nbytes: math.ceil(STARTUP_FIXED_S + 2 * nbytes / (read_gbps * GB))
    return Plan(model=model, gpu=gpu, expert_dtype=expert_dtype, gpu_bytes=gpu_bytes, expert_params=expert_params,
                bytes_per_expert=per_expert, workers=n, experts_per_worker=held, worker_bytes=per_worker,
                min_workers=min_workers, workers_fit=fits_workers, attention_weight_bytes=weights,
                kv_bytes_per_sequence=kv_seq, attention_bytes=attention, kv_capacity_tokens=capacity,
                attention_fits=fits_attention, redis_bytes=int(prefix_tokens * tier_per_token),
                fits=fits_workers and fits_attention, one_gpu_bytes=one_gpu, fits_one_gpu=one_gpu <= gpu_bytes,
                worker_read_bytes=read, worker_startup_s=budget(read), attention_startup_s=budget(weights),
                read_gbps=read_gbps)


def describe(p: Plan, context: int, batch: int, prefix_tokens: int) -> str:
    gb = lambda b: f"{b / GB:.1f} GB" if b >= GB else f"{b / 1e6:.0f} MB"
    lines = [
        f"{p.model} on {p.gpu} ({gb(p.gpu_bytes)} per GPU), routed experts in {p.expert_dtype}:",
        f"  experts: {p.expert_params / 1e9:.1f} B parameters, {gb(p.bytes_per_expert)} per expert per layer",
        f"  expert worker (of {p.workers}, {p.experts_per_worker} experts each): {gb(p.worker_bytes)} "
        f"incl. {gb(RESERVE_BYTES)} reserve -> {'fits' if p.workers_fit else 'DOES NOT FIT'}",
        f"  fewest workers that fit: {p.min_workers or 'none (one expert per worker is still too big)'}",
        f"  attention replica: weights {gb(p.attention_weight_bytes)}, KV {gb(p.kv_bytes_per_sequence)} per "
        f"{context}-token sequence x {batch} = {gb(p.attention_bytes)} -> "
        f"{'fits' if p.attention_fits else 'DOES NOT FIT'}",
        f"  KV capacity of one attention GPU: {p.kv_capacity_tokens:,} tokens ({context}-token sequences)",
        f"  Redis KV tier for {prefix_tokens:,} prefix tokens: {gb(p.redis_bytes)}",
        f"  start-up budgets at {p.read_gbps:g} GB/s from model storage: expert worker {p.worker_startup_s} s "
        f"(reads {gb(p.worker_read_bytes)}), attention replica {p.attention_startup_s} s",
        f"  everything on one GPU (monolithic): {gb(p.one_gpu_bytes)} -> "
        f"{'fits' if p.fits_one_gpu else 'does not fit'}",
        f"  => the cluster ({p.workers} expert worker GPUs + 1 attention GPU) {'fits' if p.fits else 'does NOT fit'}",
    ]
    return "\n".join(lines)


def as_json(p: Plan) -> dict:
    return asdict(p)
