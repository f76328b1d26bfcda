"""Architectures as data: `config.model_type` -> `ArchSpec`.

A spec records what the fast paths need to know about a family (norm kind, activation, RoPE, q/k-norm, soft-caps,
sliding window, embedding scale) and where its modules live. A new family is a small spec file registered here.
Unknown families still load and train through the plain HF forward (`lookup` returns None and the loader says so
once). This package imports nothing else of fastlm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

NormKind = Literal["rms", "rms_plus_one"]  # rms_plus_one: weight stored as w, applied as (1 + w) (Gemma)
Activation = Literal["silu", "gelu_tanh"]

STANDARD_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """What fastlm knows about one model family.

    Module names are relative to a decoder layer (`layers_path[i]`). `fused_linear_aliases` maps a standard
    LoRA target name (q_proj, gate_proj, ...) to the family's fused module when the family fuses them (Phi-3:
    q/k/v -> qkv_proj, gate/up -> gate_up_proj), so users can keep Unsloth's usual `target_modules` list.
    """

    family: str
    model_types: tuple[str, ...]
    norm: NormKind = "rms"
    activation: Activation = "silu"
    rope: Literal["default", "partial"] = "default"
    qk_norm: bool = False
    final_logit_softcap_attr: str | None = None  # config attribute holding the final logit soft-cap
    attn_logit_softcap_attr: str | None = None
    sliding_window_attr: str | None = None
    embedding_scale: Literal["none", "sqrt_hidden"] = "none"
    layers_path: str = "model.layers"
    attention_path: str = "self_attn"
    mlp_path: str = "mlp"
    norm_names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    fused_linear_aliases: Mapping[str, str] = field(default_factory=dict)

    def linear_names(self) -> tuple[str, ...]:
        """The family's own names for the seven transformer linear layers (fused ones once each)."""
        seen: list[str] = []
        for name in STANDARD_LINEAR_NAMES:
            own = self.fused_linear_aliases.get(name, name)
            if own not in seen:
                seen.append(own)
        return tuple(seen)

    def translate_target(self, name: str) -> str:
        """Map a standard LoRA target name to the family's module name."""
        return self.fused_linear_aliases.get(name, name)


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not spec:
            raise ValueError(f"model_type {model_type!r} is already registered by family "
                             f"{_REGISTRY[model_type].family!r}")
        _REGISTRY[model_type] = spec
    return spec


def lookup(model_type: str | None) -> ArchSpec | None:
    """The spec for a `config.model_type`, or None for families fastlm has no spec for."""
    _load_builtin_specs()
    return _REGISTRY.get(model_type or "")


def registered_model_types() -> list[str]:
    _load_builtin_specs()
    return sorted(_REGISTRY)


def registered_families() -> list[ArchSpec]:
    _load_builtin_specs()
    unique = {id(s): s for s in _REGISTRY.values()}
    return sorted(unique.values(), key=lambda s: s.family)


_loaded = False


def _load_builtin_specs() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import gemma, gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (each registers)
