"""Reading Hugging Face Llama 4 checkpoints: safetensors, single or sharded, lazily.

Names passed in are relative to the text model ("layers.3.self_attn.q_proj.weight",
"embed_tokens.weight", "lm_head.weight"); both the text-only (`model.`) and the multimodal
wrapper (`language_model.model.`) layouts resolve. An expert is read as a slice of the fused
expert tensors, so a worker never reads other experts' bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llama4.config import ModelConfig
from llama4.errors import HerdInputError

_LAYOUTS = (("model.", "lm_head."), ("language_model.model.", "language_model.lm_head."))


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HerdInputError(f"model: {self.path} is not a directory")
        self.config = ModelConfig.from_dir(self.path)
        self._files = self._index()
        self._handles: dict[str, object] = {}
        self._model_prefix, self._head_prefix = self._detect_layout()
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Identifies exactly these weights (llama4.fingerprint): config.json and every tensor byte."""
        if self._fingerprint is None:
            from llama4.fingerprint import fingerprint
            from llama4.store import cache_home

            self._fingerprint = fingerprint(self.path, sorted(set(self._files.values())), cache_home())
        return self._fingerprint

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise HerdInputError(f"checkpoint: cannot read {index}: {exc}") from None
            return dict(weight_map)
        single = self.path / "model.safetensors"
        if not single.exists():
            raise HerdInputError(f"checkpoint: {self.path} has neither model.safetensors "
                                 "nor model.safetensors.index.json")
        with safe_open(single, framework="pt") as f:
            return {key: single.name for key in f.keys()}

    def _detect_layout(self) -> tuple[str, str]:
        for model_prefix, head_prefix in _LAYOUTS:
            if f"{model_prefix}embed_tokens.weight" in self._files:
                return model_prefix, head_prefix
        raise HerdInputError(
            f"checkpoint: {self.path} has no embed_tokens.weight under 'model.' or 'language_model.model.'")

    def _handle(self, filename: str):
        if filename not in self._handles:
            file = self.path / filename
            if not file.exists():
                raise HerdInputError(f"checkpoint: shard {file} named in the index does not exist")
            self._handles[filename] = safe_open(file, framework="pt")
        return self._handles[filename]

    def full_name(self, name: str) -> str:
        if name.startswith("lm_head."):
            return self._head_prefix + name[len("lm_head."):]
        return self._model_prefix + name

    def _slice(self, name: str):
        full = self.full_name(name)
        if full not in self._files:
            raise HerdInputError(f"checkpoint: tensor {full!r} is missing from {self.path}")
        return full, self._handle(self._files[full]).get_slice(full)

    def _check_shape(self, full: str, actual, expected: tuple[int, ...]) -> None:
        if tuple(actual) != tuple(expected):
            raise HerdInputError(f"checkpoint: tensor {full!r} has shape {list(actual)}; expected {list(expected)}")

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               device: str | torch.device = "cpu") -> torch.Tensor:
        full, sl = self._slice(name)
        self._check_shape(full, sl.get_shape(), shape)
        return sl[:].to(device=device, dtype=dtype)

    def experts(self, name: str, expert_ids: list[int], shape: tuple[int, ...], dtype: torch.dtype,
                device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows expert_ids of a fused [E, ...] expert tensor, read one contiguous run at a time."""
        full, sl = self._slice(name)
        self._check_shape(full, sl.get_shape(), shape)
        parts, ids = [], sorted(expert_ids)
        if ids != list(expert_ids):
            raise HerdInputError(f"checkpoint: expert ids must be ascending, got {expert_ids}")
        start = 0
        while start < len(ids):
            end = start
            while end + 1 < len(ids) and ids[end + 1] == ids[end] + 1:
                end += 1
            parts.append(sl[ids[start] : ids[end] + 1])
            start = end + 1
        stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
        return stacked.to(device=device, dtype=dtype)


def save_checkpoint(path: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                    extra_files: dict[str, str] | None = None) -> None:
    """Write config.json + model.safetensors in the text-only HF layout (keys as given)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
