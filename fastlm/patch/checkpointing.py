"""Gradient (activation) checkpointing on one model instance.

`use_gradient_checkpointing` accepts True, False or "unsloth". True is transformers' non-reentrant checkpointing;
"unsloth" keeps only each decoder layer's input, offloaded to pinned CPU memory on CUDA and prefetched for the
recompute in backward (patch/offload_checkpointing.py); models without transformers' checkpointing layers get
plain checkpointing. While "unsloth" is installed, transformers' own enable calls (TRL's around every generation
step, the Trainer's at train start) keep the offloaded function and its disable calls disable; True (plain) is left
to transformers entirely.
transformers >= 5.2x names these methods `activation_checkpointing_*` and deprecates the `gradient_checkpointing_*`
names; both generations are supported (the GPU image has 5.17).
"""
from __future__ import annotations


def is_checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def enable_gradient_checkpointing(model, mode) -> None:
    if not mode:
        disable_gradient_checkpointing(model)
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    from .offload_checkpointing import install_offloaded_checkpointing, remove_offloaded_checkpointing

    if mode == "unsloth":
        try:
            install_offloaded_checkpointing(model)
        except NotImplementedError:
            pass  # no GradientCheckpointingLayer: plain checkpointing, installed above
    else:
        remove_offloaded_checkpointing(model)


def disable_gradient_checkpointing(model) -> None:
    from .offload_checkpointing import remove_offloaded_checkpointing

    remove_offloaded_checkpointing(model)
    if not is_checkpointing(model):
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
