"""Per-instance fast paths: `apply(model, options) -> PatchSet` installs the patches that fit this model, in one
ordered list; `remove(model)` gives back the plain transformers model bit-for-bit. `import fastlm` changes nothing
in transformers, PEFT or TRL: every change lives on one model instance."""
from __future__ import annotations

from ..state import base_model_of
from .patchset import Patch, PatchOptions, PatchSet, Undo, chain, replace_attr

_ATTR = "_fastlm_patches"


def _arch_of(model):
    from ..arch import ArchConfigError, lookup

    spec = lookup(getattr(model.config, "model_type", None))
    if spec is None:
        return None
    try:
        return spec.resolve(model.config)
    except ArchConfigError:
        return None


def _patches() -> list[Patch]:
    from .registry import PATCHES

    return PATCHES


def patch_set(model) -> PatchSet | None:
    """The PatchSet installed on this model (through PEFT wrappers), or None."""
    return base_model_of(model).__dict__.get(_ATTR)


def apply(model, options: PatchOptions | None = None) -> PatchSet:
    """Install every patch that fits this model and is not installed yet. `options` default to the ones of an
    earlier `apply` on this model (or PatchOptions())."""
    base = base_model_of(model)
    ps = patch_set(base)
    if ps is None:
        ps = PatchSet(options=options or PatchOptions(), arch=_arch_of(base))
        object.__setattr__(base, _ATTR, ps)
    elif options is not None and options != ps.options:
        remove(base)
        return apply(base, options)
    for patch in _patches():
        if patch.name in ps:
            continue
        undo = patch.install(model, ps.arch, ps.options)
        if undo is not None:
            ps.installed.append((patch.name, undo))
    return ps


def remove(model, names=None) -> list[str]:
    """Undo installed patches (all, or only `names`) in reverse order. Returns the names removed."""
    base = base_model_of(model)
    ps = patch_set(base)
    if ps is None:
        return []
    removed = []
    for name, undo in reversed(list(ps.installed)):
        if names is None or name in names:
            undo()
            ps.installed.remove((name, undo))
            removed.append(name)
    if names is None:
        base.__dict__.pop(_ATTR, None)
    return removed


def refresh_after_lora(model) -> PatchSet | None:
    """Re-install the patches whose choice depends on the module tree, after PEFT added or removed LoRA layers.
    `model` is what the user holds (the PEFT wrapper), so installs see the LoRA layers."""
    ps = patch_set(model)
    if ps is None:
        return None
    remove(model, {p.name for p in _patches() if p.follows_lora})
    return apply(model)


__all__ = ["Patch", "PatchOptions", "PatchSet", "Undo", "apply", "chain", "patch_set", "refresh_after_lora",
           "remove", "replace_attr"]
