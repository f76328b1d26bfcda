"""The merged weights of a (PEFT-wrapped, possibly 4-bit) model as a stream of `(checkpoint name, tensor)`.

Names are the plain transformers checkpoint names (`model.layers.0.self_attn.q_proj.weight`): PEFT's
`base_layer` / `modules_to_save` wrappers are unwrapped and LoRA tensors are folded in as `W + scale * B @ A`
(PEFT's own `get_delta_weight`, so rsLoRA, fan-in-fan-out and embedding LoRA follow PEFT exactly). The model in
memory is never changed.

For a model loaded in 4-bit (bitsandbytes), the weights of quantized layers are read one tensor at a time from the
original 16-bit checkpoint the model was loaded from (`state.source.path`), so the merge adds LoRA to the real
weights, not to their 4-bit approximation, and memory stays bounded by one tensor. Only when that checkpoint is
itself pre-quantized are the 4-bit weights dequantized (with a warning).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch

from ..errors import FastLMError, UnsupportedFeatureError
from ..state import base_model_of, get_state

logger = logging.getLogger(__name__)


class SourceCheckpointError(FastLMError, OSError):
    """The original checkpoint lacks a tensor the merge needs."""


def _is_quantized_linear(module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "Linear8bitLt")


def active_adapters(model) -> list[str]:
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        return []
    names = getattr(model, "active_adapters", None)
    if callable(names):
        names = names()
    if names is None:
        names = getattr(model, "active_adapter", None)
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """Clean module name -> PEFT LoRA layer, for the base transformers model under `model`."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a core dependency; without it there are no adapters
        return {}
    base = base_model_of(model)
    return {name: mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)}


def check_mergeable(model) -> None:
    for name, mod in lora_layers(model).items():
        if len(getattr(mod, "lora_magnitude_vector", None) or {}):
            raise UnsupportedFeatureError(
                f"merging DoRA adapters ({name}) is not supported by fastlm's merged/GGUF export yet. Fix: save the "
                "adapter with save_method='lora', or train with use_dora=False.")


class SourceCheckpoint:
    """Lazy reader of the safetensors shards in a model directory (one tensor at a time)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.path / f for k, f in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for f in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as fh:
                    self.files.update({k: f for k in fh.keys()})
        self._open: dict[Path, object] = {}

    @property
    def is_prequantized(self) -> bool:
        cfg = self.path / "config.json"
        return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise SourceCheckpointError(
                f"the original checkpoint in {self.path} has no tensor {key!r}, which the merge of a 4-bit model "
                "reads in 16-bit. Fix: keep the original model directory unchanged, or load the model in 16-bit "
                "(load_in_4bit=False) before exporting.")
        f = self.files[key]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(key)


def _clean_key(key: str, adapters: list[str]) -> str | None:
    """Checkpoint name for a state-dict key of a PEFT-wrapped model, or None for keys that are not saved."""
    if ".lora_" in key or ".original_module." in key or "_fake_quantizer." in key:
        return None
    if ".modules_to_save." in key:
        head, tail = key.split(".modules_to_save.", 1)
        adapter, rest = tail.split(".", 1)
        return f"{head}.{rest}" if adapter in adapters else None
    return key.replace(".base_layer.", ".")


def _tied_output_key(base) -> str | None:
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if out is None or inp is None or getattr(out, "weight", None) is None:
        return None
    if out.weight is not inp.weight and out.weight.data_ptr() != inp.weight.data_ptr():
        return None
    for name, mod in base.named_modules():
        if mod is out:
            return name + ".weight"
    return None


def _dequantized(module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if hasattr(weight, "quant_state") and weight.quant_state is not None:
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = getattr(weight, "SCB", None)
    if scb is not None:
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0
    return weight.data.float()


def model_dtype(model) -> torch.dtype:
    """The dtype the model computes in: its embedding's (never quantized), else its first float parameter."""
    base = base_model_of(model)
    emb = base.get_input_embeddings()
    if emb is not None and emb.weight.dtype.is_floating_point:
        return emb.weight.dtype
    for p in base.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def merged_tensors(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(checkpoint name, CPU tensor)` of the merged model, one tensor at a time."""
    check_mergeable(model)
    dtype = dtype or model_dtype(model)
    base = base_model_of(model)
    adapters = active_adapters(model)
    loras = {name.replace(".base_layer", ""): mod for name, mod in lora_layers(model).items()}
    quantized = {name.replace(".base_layer", ""): mod for name, mod in base.named_modules()
                 if _is_quantized_linear(mod)}
    tied = _tied_output_key(base)
    source = None
    if quantized:
        state = get_state(model)
        src_path = getattr(getattr(state, "source", None), "path", None)
        source = SourceCheckpoint(src_path) if src_path is not None else None
        if source is None or source.is_prequantized:
            logger.warning("fastlm: the original 16-bit weights of this 4-bit model are not available (%s); merging "
                           "into the dequantized 4-bit weights instead.",
                           "pre-quantized checkpoint" if source is not None else "unknown source")
            source = None
    seen: set[str] = set()
    for key, value in base.state_dict().items():
        name = _clean_key(key, adapters)
        if name is None or name == tied or name in seen:
            continue
        module_name, _, leaf = name.rpartition(".")
        qmod = quantized.get(module_name)
        if qmod is not None and leaf != "weight" and leaf != "bias":
            continue  # bitsandbytes' quant-state entries (weight.absmax, ...) - the weight is written whole
        if qmod is None and any(name.startswith(q + ".weight.") for q in _prefixes(name, quantized)):
            continue
        seen.add(name)
        if qmod is not None and leaf == "weight":
            tensor = source.get(name).float() if source is not None else _dequantized(qmod)
        else:
            tensor = value.detach()
        lora = loras.get(module_name) if leaf == "weight" else None
        if lora is not None and not getattr(lora, "merged", False):
            tensor = tensor.float()
            for adapter in adapters:
                if adapter in getattr(lora, "lora_A", {}) or adapter in getattr(lora, "lora_embedding_A", {}):
                    tensor = tensor + lora.get_delta_weight(adapter).detach().float().to(tensor.device)
        yield name, tensor.to(device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def _prefixes(name: str, quantized: dict) -> list[str]:
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in quantized]


def merged_nbytes(model, dtype: torch.dtype | None = None) -> int:
    """Bytes the merged weights take at `dtype` (quantized layers counted at their full size)."""
    dtype = dtype or model_dtype(model)
    size = torch.empty((), dtype=dtype).element_size()
    base = base_model_of(model)
    total = 0
    for name, mod in base.named_modules():
        if _is_quantized_linear(mod):
            total += mod.in_features * mod.out_features * size
    for name, p in base.named_parameters():
        if ".lora_" in name or _is_quantized_param(p):
            continue
        total += p.numel() * size
    return total


def _is_quantized_param(p) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")
