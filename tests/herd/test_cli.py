"""The `herd` command as a user runs it: subprocesses, exit codes, output contracts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def herd(*args, home: Path, timeout=300):
    env = {**os.environ, "HERD_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "herd", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_init_model_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import Llama4ForCausalLM

    from llama4.checkpoint import Checkpoint
    from llama4.model import Llama4Model

    out = tmp_path / "ckpt"
    r = herd("init-model", "--preset", "tiny-scout", "--out", str(out), "--seed", "3", home=tmp_path)
    assert r.returncode == 0, r.stderr
    hf = Llama4ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, 202048, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    model = Llama4Model.load(Checkpoint(out))
    cache = model.new_cache(1024)
    cache.ensure(0, 70)
    ours = model.forward(ids[0], cache.plan([(0, 0, 70)]), cache, torch.arange(70))
    assert (ours - ref).abs().max().item() <= 1e-4


def test_score_json_contract_and_generate_streams(tmp_path):
    r = herd("score", "--model", "tiny-maverick", "--text", "The llama grazes.", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ids"][0] == 200000 and len(out["ids"]) == len(out["logprobs"]) >= 4
    assert out["logprobs"][0] is None and all(lp < 0 for lp in out["logprobs"][1:])
    r2 = herd("score", "--model", "tiny-maverick", "--ids", ",".join(map(str, out["ids"])), "--json", home=tmp_path)
    assert json.loads(r2.stdout) == out
    g = herd("generate", "--model", "tiny-maverick", "--prompt", "Hello", "--max-tokens", "8", home=tmp_path)
    assert g.returncode == 0, g.stderr
    assert g.stdout.strip() and "8 tokens" in g.stderr


@pytest.mark.parametrize("args,needle", [
    (["score", "--model", "no-such-model", "--text", "x"], "no-such-model"),
    (["score", "--model", "tiny-maverick", "--ids", "1,2,202048"], "202048"),
    (["score", "--model", "tiny-maverick", "--ids", "1,two"], "--ids"),
    (["generate", "--model", "tiny-maverick", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "tiny-maverick", "--prompt", "x", "--max-tokens", "-3"], "max_tokens"),
    (["generate", "--prompt", "x", "--max-tokens", "lots"], "--max-tokens"),
    (["init-model", "--preset", "llama9", "--out", "/tmp/x"], "llama9"),
    (["generate", "--model", "/nonexistent/dir/", "--prompt", "x"], "nonexistent"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    r = herd(*args, home=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_default_model_answers_in_english(herd_home):
    r = herd("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "24", home=herd_home)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
