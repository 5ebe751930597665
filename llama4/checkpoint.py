"""Reading Hugging Face Llama 4 checkpoints: safetensors, single or sharded, lazily.

Names passed in are relative to the text model ("layers.3.self_attn.q_proj.weight",
"embed_tokens.weight", "lm_head.weight"); both the text-only (`model.`) and the multimodal
wrapper (`language_model.model.`) layouts resolve. Routed experts come fused (HF's
`experts.gate_up_proj` [E, H, 2I]) or unfused, one set of nn.Linear weights per expert (the
layout of Meta's FP8 release, where they are E4M3 with per-row scales); either way an expert
is read on its own, so a worker never reads other experts' bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from llama4.config import ModelConfig, read_config_json
from llama4.errors import HerdInputError
from llama4.quant import QuantSpec

_LAYOUTS = (("model.", "lm_head."), ("language_model.model.", "language_model.lm_head."))
FUSED, UNFUSED = "fused", "unfused"
_FP8 = "F8_E4M3"
_UNFUSED_MATRICES = ("gate_proj", "up_proj", "down_proj")
PREPROCESSOR_CONFIG, PROCESSOR_CONFIG = "preprocessor_config.json", "processor_config.json"  # the image processor's


@dataclass
class StoredWeight:
    """One expert matrix as stored: w [out, in] in its stored dtype, scale [out] fp32 for FP8 (else None)."""

    w: torch.Tensor
    scale: torch.Tensor | None

    def dequantized(self) -> torch.Tensor:
        """fp32 [out, in]; FP8 scales multiply in fp32 (a bf16 product moves log-probabilities by ~4e-2)."""
        w = self.w.float()
        return w if self.scale is None else w * self.scale[:, None]


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HerdInputError(f"model: {self.path} is not a directory")
        raw = read_config_json(self.path)  # read once: the text config, quantization and vision all come from it
        self.config = ModelConfig.from_hf_dict(raw, name=str(self.path))
        self._files = self._index()
        self._handles: dict[str, object] = {}
        self._model_prefix, self._head_prefix = self._detect_layout()
        self._fingerprint: str | None = None
        self.quant = QuantSpec.read(raw.get("quantization_config"))
        self.vision_config = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else None
        self.image_token_id = raw.get("image_token_index")  # the <|patch|> id image features replace
        self.image_processor = self._image_processor()  # read and checked at load, as the tower's config is
        if self.quant:
            self.quant.check_ignore(set(self._files))
        self.expert_layout = self._detect_expert_layout()
        self.stored_fp8 = self._experts_stored_fp8()
        if self.stored_fp8 and not self.quant:
            raise HerdInputError("checkpoint: routed experts are stored as F8_E4M3 but config.json has no "
                                 "quantization_config saying how to read them")

    def _image_processor(self):
        """The multimodal checkpoint's llama4.images.ImageProcessor (its processor files), else None."""
        if self.vision_config is None:
            return None
        from llama4.images import ImageProcessor
        from llama4.vision import VisionConfig

        return ImageProcessor.from_checkpoint(self.path, VisionConfig.from_hf_dict(self.vision_config))

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

    def _detect_expert_layout(self) -> str:
        moe = self.config.moe_layer_list
        if not moe:
            return FUSED
        p = f"{self._model_prefix}layers.{moe[0]}.feed_forward.experts."
        if p + "gate_up_proj" in self._files:
            return FUSED
        if p + "0.gate_proj.weight" in self._files:
            return UNFUSED
        raise HerdInputError(f"checkpoint: {self.path} has neither {p}gate_up_proj (fused experts) "
                             f"nor {p}0.gate_proj.weight (one set of weights per expert)")

    def _dtype(self, name: str) -> str:
        return self._slice(name)[1].get_dtype()

    def _experts_stored_fp8(self) -> bool:
        moe = self.config.moe_layer_list
        if not moe or self.expert_layout == FUSED:
            return bool(moe) and self._dtype(f"layers.{moe[0]}.feed_forward.experts.gate_up_proj") == _FP8
        return self._dtype(f"layers.{moe[0]}.feed_forward.experts.0.gate_proj.weight") == _FP8

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
        if sl.get_dtype() == _FP8:  # a cast would drop its scale: refuse rather than compute wrong numbers
            raise HerdInputError(f"checkpoint: tensor {full!r} is stored as {_FP8}; herd reads FP8 weights only "
                                 "for routed experts (list this module in quantization_config.ignore)")
        return sl[:].to(device=device, dtype=dtype)

    def has_tensor(self, full_name: str) -> bool:
        return full_name in self._files

    def raw_tensor(self, full_name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> torch.Tensor:
        """A tensor outside the text model (the vision tower), by its full checkpoint name."""
        if full_name not in self._files:
            raise HerdInputError(f"checkpoint: tensor {full_name!r} is missing from {self.path}")
        sl = self._handle(self._files[full_name]).get_slice(full_name)
        self._check_shape(full_name, sl.get_shape(), shape)
        return sl[:].to(device=device, dtype=dtype)

    def expert_weights(self, layer: int, expert: int) -> tuple[StoredWeight, StoredWeight]:
        """(gate_up [2I, H], down [H, I]) of one expert as stored, [out, in] (nn.Linear) orientation."""
        cfg = self.config
        h, i = cfg.hidden_size, cfg.intermediate_size
        p = f"layers.{layer}.feed_forward.experts."
        if self.expert_layout == FUSED:
            parts = []
            for name, shape in ((p + "gate_up_proj", (cfg.num_local_experts, h, 2 * i)),
                                (p + "down_proj", (cfg.num_local_experts, i, h))):
                full, sl = self._slice(name)
                self._check_shape(full, sl.get_shape(), shape)
                if sl.get_dtype() == _FP8:
                    raise HerdInputError(f"checkpoint: fused expert tensor {full!r} is {_FP8}; herd reads FP8 "
                                         "experts in the unfused per-expert layout (with weight_scale)")
                parts.append(StoredWeight(sl[expert : expert + 1][0].t(), None))
            return parts[0], parts[1]
        gate, up, down = (self._unfused(p + f"{expert}.{m}", shape)
                          for m, shape in zip(_UNFUSED_MATRICES, ((i, h), (i, h), (h, i)), strict=True))
        scale = None if gate.scale is None else torch.cat([gate.scale, up.scale])
        if (gate.scale is None) != (up.scale is None):
            raise HerdInputError(f"checkpoint: {self.full_name(p)}{expert}: gate_proj and up_proj differ in dtype")
        return StoredWeight(torch.cat([gate.w, up.w]), scale), down

    def _unfused_slices(self, name: str, shape: tuple[int, int]):
        """(weight slice, scale slice or None) of one unfused expert matrix, checked from headers only."""
        full, sl = self._slice(name + ".weight")
        self._check_shape(full, sl.get_shape(), shape)
        if sl.get_dtype() != _FP8:
            return sl, None
        scale_name = self.full_name(name + ".weight_scale")
        if scale_name not in self._files:
            raise HerdInputError(f"checkpoint: tensor {full!r} is {_FP8} but its scale {scale_name!r} is missing")
        _, scale = self._slice(name + ".weight_scale")
        self._check_shape(scale_name, scale.get_shape(), (shape[0], 1))
        return sl, scale

    def _unfused(self, name: str, shape: tuple[int, int]) -> StoredWeight:
        sl, scale = self._unfused_slices(name, shape)
        return StoredWeight(sl[:], None if scale is None else scale[:].float().reshape(-1))

    def check_experts(self) -> None:
        """Every routed-expert tensor (and FP8 scale) exists with its shape, read from headers only:
        a bad expert fails the start, not the one worker that would have loaded it."""
        cfg = self.config
        h, i = cfg.hidden_size, cfg.intermediate_size
        for l in cfg.moe_layer_list:
            p = f"layers.{l}.feed_forward.experts."
            if self.expert_layout == FUSED:
                for name, shape in ((p + "gate_up_proj", (cfg.num_local_experts, h, 2 * i)),
                                    (p + "down_proj", (cfg.num_local_experts, i, h))):
                    full, sl = self._slice(name)
                    self._check_shape(full, sl.get_shape(), shape)
                continue
            for e in range(cfg.num_local_experts):
                for m, shape in zip(_UNFUSED_MATRICES, ((i, h), (i, h), (h, i)), strict=True):
                    sl, _ = self._unfused_slices(f"{p}{e}.{m}", shape)
                    if (sl.get_dtype() == _FP8) != self.stored_fp8:
                        want = _FP8 if self.stored_fp8 else "unquantized"
                        raise HerdInputError(f"checkpoint: tensor {self.full_name(f'{p}{e}.{m}.weight')!r} is "
                                             f"{sl.get_dtype()}; every routed expert must be stored alike ({want})")


def read_processor_configs(path: str | Path) -> tuple[dict | None, str, dict]:
    """(image processor settings or None without any, the file they came from, processor settings or {})
    of a checkpoint directory. As transformers reads them: processor_config.json's "image_processor"
    entry, when it has one, wins over preprocessor_config.json."""
    image = _json_object(Path(path) / PREPROCESSOR_CONFIG)
    processor = _json_object(Path(path) / PROCESSOR_CONFIG) or {}
    nested = processor.get("image_processor")
    if nested is None:
        return image, PREPROCESSOR_CONFIG, processor
    if not isinstance(nested, dict):
        raise HerdInputError(f"{PROCESSOR_CONFIG}: image_processor={nested!r} is invalid; allowed: a JSON object")
    return nested, f"{PROCESSOR_CONFIG} image_processor", processor


def _json_object(file: Path) -> dict | None:
    if not file.exists():
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise HerdInputError(f"checkpoint: cannot read {file}: {exc}") from None
    if not isinstance(raw, dict):
        raise HerdInputError(f"checkpoint: {file} must hold a JSON object")
    return raw


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
