"""Patches as a set you can take back.

A `Patch` installs one change on one model instance (bound forwards, hooks, swapped modules, flags) and returns
an `undo` that restores every original it touched. `PatchSet` (kept on the model instance as `_fastlm_patches`)
records what is installed, in order; applying a patch that is installed already is a no-op, and `remove` undoes
in reverse order, giving back the plain HF model bit-for-bit. Patches whose choice depends on the module tree
(LoRA layers present or not) are marked `follows_lora` and are re-installed when PEFT changes the tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

Undo = Callable[[], None]
_MISSING = object()


@dataclass(frozen=True)
class PatchOptions:
    """What the user asked for that decides which patches apply (from the LoadPlan, or given directly)."""

    quantization: str | None = None
    offload_embedding: bool = False
    tiled_mlp: bool = False
    fast_kernels: bool = True  # Triton kernels / fused paths where the family has a spec


@dataclass(frozen=True)
class Patch:
    """`install(model, arch, options)` returns an undo, or None when the patch has nothing to do on this model.
    `arch` is the resolved ArchConfig, or None for families without a spec."""

    name: str
    install: Callable[[Any, Any, PatchOptions], Optional[Undo]]
    follows_lora: bool = False


@dataclass
class PatchSet:
    options: PatchOptions
    arch: Any = None
    installed: list[tuple[str, Undo]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.installed]

    def __contains__(self, name: str) -> bool:
        return name in self.names


def replace_attr(obj, name: str, value) -> Undo:
    """Set an instance attribute (e.g. a bound `forward`) and return the undo that restores the original state,
    including "no instance attribute at all"."""
    old = obj.__dict__.get(name, _MISSING)
    object.__setattr__(obj, name, value)

    def undo() -> None:
        if old is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            object.__setattr__(obj, name, old)

    return undo


def chain(undos: list[Undo]) -> Optional[Undo]:
    """One undo for several (run in reverse order); None when the list is empty."""
    if not undos:
        return None

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo
