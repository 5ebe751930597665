"""`herd plan`: memory arithmetic that matches what herd holds, and the published fits."""
import json
import subprocess
import sys

import pytest

from herd.plan import expert_bytes, plan
from llama4.presets import preset


def test_bytes_per_expert_follow_the_banks():
    cfg = preset("maverick")
    params = 3 * cfg.hidden_size * cfg.intermediate_size
    assert expert_bytes(cfg, "bf16") == 2 * params
    assert expert_bytes(cfg, "fp8") == params + 4 * (2 * cfg.intermediate_size + cfg.hidden_size)
    assert expert_bytes(cfg, "int4") / params == pytest.approx(0.53125)  # group 128
    assert expert_bytes(cfg, "int4-g32") / params == pytest.approx(0.625)


def test_maverick_bf16_needs_more_than_8_h100_workers_and_fp8_fits_on_8():
    bf16 = plan("maverick", "h100-80gb", "bf16", workers=8)
    assert not bf16.workers_fit and not bf16.fits and bf16.min_workers > 8
    assert plan("maverick", "h100-80gb", "bf16", workers=bf16.min_workers).workers_fit
    fp8 = plan("maverick", "h100-80gb", "fp8", workers=8)
    assert fp8.fits and fp8.worker_bytes < 80e9 and fp8.min_workers <= 8
    assert fp8.expert_params == pytest.approx(386.5e9, rel=1e-3)


def test_scout_int4_fits_on_one_h100():
    """Meta: Int4 Scout "fits on a single H100 GPU"; the cluster needs one expert worker GPU."""
    p = plan("scout", "h100-80gb", "int4", workers=1, batch=1)
    assert p.workers_fit and p.min_workers == 1 and p.fits_one_gpu and p.one_gpu_bytes < 80e9
    assert not plan("scout", "h100-80gb", "int4-g32", batch=1).fits_one_gpu  # finer groups cost 9 GB more


def test_startup_budgets_grow_with_what_a_process_reads():
    fp8, bf16 = plan("maverick", "h100-80gb", "fp8", workers=8), plan("maverick", "h100-80gb", "bf16", workers=8)
    assert fp8.worker_read_bytes == pytest.approx(bf16.worker_read_bytes / 2, rel=0.01)  # FP8 is read as stored
    assert 400 < fp8.worker_startup_s < bf16.worker_startup_s
    fast = plan("maverick", "h100-80gb", "fp8", workers=8, read_gbps=2.0)
    assert fast.worker_startup_s < fp8.worker_startup_s / 3


def test_kv_capacity_counts_chunked_layers_once_per_chunk():
    short, long = plan("maverick", "h100-80gb", "fp8", context=8192), plan("maverick", "h100-80gb", "fp8",
                                                                           context=131072)
    # Past the 8,192-token chunk only the 12 global layers grow: 16x the context is far less than 16x the KV.
    assert long.kv_bytes_per_sequence < 5 * short.kv_bytes_per_sequence


def test_cli_json_and_bad_input():
    out = subprocess.run([sys.executable, "-m", "herd", "plan", "--model", "maverick", "--expert-dtype", "bf16",
                          "--workers", "8", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["fits"] is False and isinstance(data["min_workers"], int) and data["min_workers"] > 8
    text = subprocess.run([sys.executable, "-m", "herd", "plan", "--model", "maverick", "--expert-dtype", "fp8"],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "fits" in text.stdout and "expert worker" in text.stdout
    bad = subprocess.run([sys.executable, "-m", "herd", "plan", "--model", "maverick", "--gpu", "tpu"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--gpu='tpu'" in bad.stderr
