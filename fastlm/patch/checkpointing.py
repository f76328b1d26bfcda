"""Gradient checkpointing on one model instance.

`use_gradient_checkpointing` accepts True, False or "unsloth". "unsloth" will become the activation-offloading
variant with the kernel work; until then it is standard non-reentrant checkpointing, like True.
"""
from __future__ import annotations


def enable_gradient_checkpointing(model, mode) -> None:
    if not mode:
        disable_gradient_checkpointing(model)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def disable_gradient_checkpointing(model) -> None:
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
