"""Patches as a set you can take back.

A `Patch` installs one change on one model instance (bound forwards, hooks, swapped modules, flags) and returns
an `undo` that restores every original it touched. Forwards and undos hold the modules they touch only through
attributes (bound methods, state objects), never closures, so `copy.deepcopy` of a patched model gives a model that
computes with, trains, and unpatches its own modules. `PatchSet` (kept on the model instance as `_fastlm_patches`)
records what is installed, in order; applying a patch that is installed already is a no-op, and `remove` undoes
in reverse order, giving back the plain HF model bit-for-bit. Patches whose choice depends on the module tree
(LoRA layers present or not) are marked `follows_lora` and are re-installed when PEFT changes the tree.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

Undo = Callable[[], None]


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


class SetAttr:
    """The undo of one instance attribute set by `replace_attr`: gives back the old value, or no instance attribute
    at all. A plain object, not a closure: `copy.deepcopy` of the model copies it with the model, so the copy's undo
    restores the copy's modules (a closure would keep pointing at the original's)."""

    def __init__(self, obj, name: str, value):
        self.obj, self.name = obj, name
        self.had = name in obj.__dict__
        self.old = obj.__dict__.get(name)
        object.__setattr__(obj, name, value)

    def __call__(self) -> None:
        if self.had:
            object.__setattr__(self.obj, self.name, self.old)
        else:
            self.obj.__dict__.pop(self.name, None)


def replace_attr(obj, name: str, value) -> Undo:
    """Set an instance attribute (e.g. a bound `forward`) and return the undo that restores the original state,
    including "no instance attribute at all"."""
    return SetAttr(obj, name, value)


class Chain:
    """Several undos as one, run in reverse order (deep-copied with the model like `SetAttr`)."""

    def __init__(self, undos: list[Undo]):
        self.undos = list(undos)

    def __call__(self) -> None:
        for undo in reversed(self.undos):
            undo()


def chain(undos: list[Undo]) -> Optional[Undo]:
    """One undo for several (run in reverse order); None when the list is empty."""
    return Chain(undos) if undos else None


def bind_forward(module, forward: Callable, slot: str, state) -> Undo:
    """Install `forward(self, ...)` as this instance's forward, bound to `module` itself, with its per-instance
    state (settings, the forward it wraps) in `module.<slot>`. Returns the undo, which restores both exactly.

    `forward` is a module-level function that reads everything from `self` and `getattr(self, slot)`, never from a
    closure: `copy.deepcopy` rebinds a bound method to the copied module and copies the state (and the bound
    forwards it holds) with it, so a deep copy computes with its own weights. Bound to the module (not to the
    state), it also survives accelerate rebinding `model.forward.__func__` to the model for mixed precision."""
    undo_state = replace_attr(module, slot, state)
    return Chain([undo_state, replace_attr(module, "forward", types.MethodType(forward, module))])


def is_bound_forward(module, forward: Callable) -> bool:
    """Whether `module.forward` is `forward` bound to `module` (installed by `bind_forward`, nothing on top)."""
    current = module.__dict__.get("forward")
    return getattr(current, "__func__", None) is forward and getattr(current, "__self__", None) is module
