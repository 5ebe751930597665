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
        cfg = DeployConfig.load(None, **{"model": CLUSTER_MODEL, "attention_port": 0, "dashboard": False, **overrides})
        with Cluster(cfg, log=lambda *_: None) as cluster:
            yield cluster

    return start


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
