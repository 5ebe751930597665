"""The cluster on an FP8 checkpoint (Meta's release layout): workers hold their experts in FP8 and
the cluster equals transformers on the dequantized weights; a malformed one fails `herd up` at once."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.client import Client
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.errors import HerdInputError
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams


# First: one local Ray cluster per process, and the module's cluster below lives until the end.
def test_malformed_fp8_checkpoint_fails_herd_up_at_once_naming_the_tensor(local_cluster, fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    missing = "language_model.model.layers.3.feed_forward.experts.77.down_proj.weight_scale"
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / shard)
        tensors.pop(missing, None)
        save_file(tensors, tmp_path / shard)
    del index["weight_map"][missing]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    start = time.monotonic()
    with pytest.raises(HerdInputError, match=f"its scale '{missing}' is missing"), \
            local_cluster(model=str(tmp_path), workers=2, startup_timeout_s=120):
        pass
    assert time.monotonic() - start < 60  # refused, not waited out


@pytest.fixture(scope="module")
def fp8_cluster(local_cluster, fp8_checkpoint):
    path, _ = fp8_checkpoint
    with local_cluster(model=str(path), workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def fp8_mono(fp8_checkpoint):
    return Llama4Model.load(Checkpoint(fp8_checkpoint[0]))


def _ids(n, seed):
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_fp8_cluster_scores_equal_transformers_and_monolithic(fp8_cluster, fp8_checkpoint, fp8_mono):
    _, ref = fp8_checkpoint
    ids = _ids(70, 1)
    got = torch.tensor(list(Client(fp8_cluster.attention_address).score(ids=ids).logprobs))
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (got - want).abs().max().item() <= 1e-3
    (seq,) = Engine(fp8_mono).run([Request(ids, SamplingParams(max_tokens=0), prompt_logprobs=True)])
    assert (got - torch.tensor(seq.prompt_logprobs[1:])).abs().max().item() <= 1e-5


def test_fp8_cluster_generates_the_monolithic_tokens(fp8_cluster, fp8_mono):
    client = Client(fp8_cluster.attention_address)
    prompts = [_ids(9, 2), _ids(33, 3)]
    want = [s.output_ids for s in Engine(fp8_mono).run(
        [Request(p, SamplingParams(max_tokens=16, ignore_eos=True)) for p in prompts])]
    for p, w in zip(prompts, want, strict=True):
        got = [t for msg in client.generate(ids=p, max_tokens=16, ignore_eos=True) for t in msg.token_ids]
        assert got == w


def test_status_reports_each_workers_resident_expert_bytes(fp8_cluster, herd_home):
    cfg = Checkpoint(fp8_cluster.cfg.model).config
    per_expert = len(cfg.moe_layers) * 3 * cfg.hidden_size * cfg.intermediate_size
    st = Client(fp8_cluster.attention_address, operator=True).status()
    workers = list(st.router.workers)
    assert len(workers) == 2 and sum(len(w.experts) for w in workers) == cfg.num_local_experts
    for w in workers:
        held = dict(w.expert_bytes)
        assert held["fp8"] == len(w.experts) * per_expert  # one byte per expert parameter
        assert held["float32"] == len(w.experts) * len(cfg.moe_layers) * (2 * cfg.intermediate_size
                                                                           + cfg.hidden_size) * 4  # per-row scales
    out = subprocess.run([sys.executable, "-m", "herd", "status", "--target", fp8_cluster.attention_address],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HERD_HOME": str(herd_home)})
    assert out.returncode == 0 and f"fp8 {workers[0].expert_bytes['fp8'] / 2**20:.1f} MiB" in out.stdout
