"""Where models live on disk: a checkpoint directory as given, or a preset materialised once.

Presets become real HF-layout checkpoints (seeded random weights) under the herd cache, so
every process (monolithic, attention service, router, expert workers) loads the same
bytes the same way.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llama4.checkpoint import save_checkpoint
from llama4.errors import HerdInputError
from llama4.presets import PRESETS, preset
from llama4.weights import random_tensors


def cache_home() -> Path:
    return Path(os.environ.get("HERD_HOME", Path.home() / ".cache" / "herd"))


def write_random_checkpoint(name: str, out: str | Path, seed: int = 0) -> Path:
    """`herd init-model`: a random-weight checkpoint of preset `name` that transformers loads."""
    cfg = preset(name)
    out = Path(out)
    save_checkpoint(out, cfg, random_tensors(cfg, seed))
    return out


def resolve_model(spec: str, seed: int = 0) -> Path:
    """A checkpoint directory for `spec`: an existing directory, or a preset name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec not in PRESETS:
        raise HerdInputError(f"model: {spec!r} is neither a directory nor a preset; presets: {sorted(PRESETS)}")
    target = cache_home() / "presets" / f"{spec}-seed{seed}"
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec}-"))
        write_random_checkpoint(spec, tmp, seed)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # atomic: concurrent processes never see half a checkpoint
    return target
