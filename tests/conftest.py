"""Shared fixtures: tiny Llama 4 models built by transformers (the reference) and saved to disk."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llama4.config import ModelConfig  # noqa: E402
from llama4.presets import preset  # noqa: E402

TEST_VOCAB = 1024


def tiny_config(name: str, **changes) -> ModelConfig:
    """A tiny preset with a small vocabulary (fast reference runs)."""
    base = dict(vocab_size=TEST_VOCAB, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
    return preset(name).replace(**{**base, **changes})


def hf_reference(cfg: ModelConfig, seed: int = 0):
    """transformers' Llama4ForCausalLM with random weights for this config, fp32, eager attention."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    fields = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**fields, attn_implementation="eager"))
    return model.eval()


@pytest.fixture(scope="session")
def herd_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("herd_home")
    os.environ["HERD_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def reference_models(tmp_path_factory):
    """{name: (hf_model, checkpoint_dir)} for the Maverick- and Scout-shaped tiny configs."""
    out = {}
    for name in ("tiny-maverick", "tiny-scout"):
        model = hf_reference(tiny_config(name))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


CLUSTER_MODEL = "tiny-maverick"  # the cluster tests' model: 128 experts, MoE on layers 1 and 3, Llama 4's vocabulary


@pytest.fixture(scope="session")
def local_cluster(herd_home):
    """A factory: `with local_cluster(workers=2, ...) as c:` runs `herd up` in this process
    (Redis, Ray, expert workers, router, attention) on free loopback ports."""
    from contextlib import contextmanager

    from herd.deploy import DeployConfig
    from herd.up import Cluster

    @contextmanager
    def start(**overrides):
        defaults = {"model": CLUSTER_MODEL, "attention_port": 0, "http_port": 0, "dashboard": False}
        cfg = DeployConfig.load(None, **{**defaults, **overrides})
        before = ray_processes()
        assert not before, f"an earlier test's Ray is still running: {before}"
        cluster = Cluster(cfg, log=lambda *_: None)
        try:
            yield cluster.start()
        finally:
            redis = [server.proc for server in (cluster.redis, cluster.state_redis) if server]
            cluster.stop()
            after = ray_processes() + [f"{p.pid} redis-server" for p in redis if p.poll() is None]
            assert not after, f"still running after the cluster stopped: {after}"

    return start


def ray_processes() -> list[str]:
    """Ray's processes (its GCS, raylets and workers) that this test process started and that
    still run, as 'pid command'."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(mark in cmd for mark in ("raylet", "gcs_server", "ray::", "default_worker.py")):
            found.append(f"{proc.pid} {cmd[:80]}")
    return found


@pytest.fixture(scope="module")
def mono(herd_home):
    """The monolithic model on the cluster tests' checkpoint: the reference a cluster must equal."""
    from llama4.checkpoint import Checkpoint
    from llama4.model import Llama4Model
    from llama4.store import resolve_model

    return Llama4Model.load(Checkpoint(resolve_model(CLUSTER_MODEL)))


@pytest.fixture()
def redis_server():
    """A private redis-server on a free loopback port, stopped after the test."""
    from herd.redis_server import RedisServer

    server = RedisServer()
    yield server
    server.stop()


def _linear_tree(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """nn.Linear modules at the given weight names ("a.b.c.weight" -> module a.b.c), nothing else."""
    root = torch.nn.Module()
    for name, w in weights.items():
        *path, leaf = name.removesuffix(".weight").split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        linear.weight.data.copy_(w)
        parent.add_module(leaf, linear)
    return root


def unfused_experts(tensors: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str = "model.") -> dict:
    """HF fused expert tensors -> one nn.Linear-oriented gate/up/down weight per expert (Meta's release layout)."""
    out, i = {}, cfg.intermediate_size
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :, :i].T.contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, :, i:].T.contiguous()
        elif name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].T.contiguous()
        else:
            out[name] = t
    return out


def write_fp8_checkpoint(hf_model, out: Path, shards: int = 2) -> dict[str, torch.Tensor]:
    """Meta's Maverick FP8 release layout, written by compressed-tensors itself from a bf16 model:
    the multimodal wrapper, routed experts unfused in F8_E4M3 with per-row bf16 weight_scale, every
    other Linear named in `ignore` and kept bf16, shards that split a layer's experts.
    Returns the fp32 text-model tensors (HF fused names) those bytes dequantize to exactly."""
    import json

    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from safetensors.torch import save_file

    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    bf16 = {("language_model." + k): v.detach().to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    tensors = unfused_experts(bf16, cfg, "language_model.model.")
    linear = {k: v for k, v in tensors.items() if v.ndim == 2 and "embed_tokens" not in k}
    tree = _linear_tree(linear)
    ignore = sorted(k.removesuffix(".weight") for k in linear if ".feed_forward.experts." not in k)
    qcfg = QuantizationConfig.model_validate({
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True}}},
        "ignore": ignore, "format": "float-quantized"})
    apply_quantization_config(tree, qcfg, show_progress=False)
    for module in tree.modules():  # the minmax observer: one scale per output row
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and hasattr(module, "weight_scale"):
            w = module.weight.data
            scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), scheme.weights)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(tree)
    compressor.compress_model(tree)
    stored = {**{k: v for k, v in tensors.items() if k not in linear}, **tree.state_dict()}
    stored = {k: v.contiguous() for k, v in stored.items() if not k.endswith("zero_point")}

    out.mkdir(parents=True, exist_ok=True)
    def shard_of(name: str) -> int:  # a layer's experts are split across the shards; the rest go in the first
        parts = name.split(".")
        return int(parts[parts.index("experts") + 1]) * shards // cfg.num_local_experts if "experts" in parts else 0

    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: v for k, v in stored.items() if shard_of(k) == s}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = {**cfg.to_hf_dict(), "model_type": "llama4_text"}
    wrapper = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "text_config": text}
    (out / "config.json").write_text(json.dumps(wrapper))
    compressor.update_config(str(out))

    # What those bytes mean, in fp32: weight.float() * weight_scale.float(), fused back.
    deq = {}
    for k, v in stored.items():
        if k.endswith("weight_scale"):
            continue
        scale = stored.get(k.removesuffix("weight") + "weight_scale")
        deq[k.removeprefix("language_model.")] = v.float() * scale.float() if scale is not None else v.float()
    fused = {}
    for l in cfg.moe_layer_list:
        p = f"model.layers.{l}.feed_forward.experts."
        e_range = range(cfg.num_local_experts)
        fused[p + "gate_up_proj"] = torch.stack([torch.cat([deq.pop(f"{p}{e}.gate_proj.weight").T,
                                                            deq.pop(f"{p}{e}.up_proj.weight").T], dim=1)
                                                 for e in e_range])
        fused[p + "down_proj"] = torch.stack([deq.pop(f"{p}{e}.down_proj.weight").T for e in e_range])
    return {**deq, **fused}


@pytest.fixture(scope="session")
def fp8_checkpoint(reference_models, tmp_path_factory):
    """(checkpoint dir, transformers fp32 model on the exactly dequantized weights) for tiny-maverick in FP8."""
    hf, _ = reference_models["tiny-maverick"]
    path = tmp_path_factory.mktemp("tiny-maverick-fp8")
    weights = write_fp8_checkpoint(hf, path)
    ref = hf_reference(tiny_config("tiny-maverick"))
    ref.load_state_dict(weights, strict=True)
    return path, ref


VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vision_output_dim=48,
              projector_input_dim=48, projector_output_dim=48, image_size=28, patch_size=7, pixel_shuffle_ratio=0.5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000})
PATCH_ID = 5  # the tiny vocabulary's stand-in for <|patch|>


@pytest.fixture(scope="session")
def multimodal(tmp_path_factory):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    skip = ("architectures", "torch_dtype")
    text = {k: v for k, v in tiny_config("tiny-scout").to_hf_dict().items() if k not in skip}
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=VISION,
                                                     image_token_index=PATCH_ID)).eval()
    for p in hf.vision_model.parameters():  # the default init leaves biases and norms trivial: make them count
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny-multimodal")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="session")
def multimodal_maverick(tmp_path_factory):
    """(transformers model, checkpoint dir): tiny Maverick shape with Llama 4's vocabulary and a small vision tower,
    so Meta's tokenizer (and its image tokens) serves it."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    skip = ("architectures", "torch_dtype")
    text = {k: v for k, v in preset("tiny-maverick").to_hf_dict().items() if k not in skip}
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=VISION,
                                                     image_token_index=200092)).eval()
    for p in hf.vision_model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny-maverick-multimodal")
    hf.save_pretrained(path)
    return hf, path


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A PNG of random pixels."""
    import io

    from PIL import Image as PILImage

    gen = torch.Generator().manual_seed(seed)
    if mode == "1":
        img = PILImage.new("1", (width, height))
    else:
        img = PILImage.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
