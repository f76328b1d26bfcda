"""Architectures as data: `config.model_type` -> `ArchSpec`.

A spec records what the fast paths need to know about a family (norm kind, activation, RoPE, q/k-norm, soft-caps,
sliding window, embedding scale) and where its modules live. A new family is a small spec file registered here.
Unknown families still load and train through the plain HF forward (`lookup` returns None and the loader says so
once). This package imports nothing else of fastlm.
"""
from __future__ import annotations

from .spec import ArchSpec

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
    from . import gemma, gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3

    for family in (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3):
        register(family.SPEC)
