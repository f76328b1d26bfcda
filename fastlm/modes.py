"""Training and inference modes: `FastLanguageModel.for_training(model)` / `for_inference(model)`, also attached to
the model instance as `model.for_training()` / `model.for_inference()`.

for_training: train(), use_cache off, gradient checkpointing as configured, tokenizer pads on the right.
for_inference: eval(), use_cache on, gradient checkpointing off, tokenizer pads on the left (batched generation).
"""
from __future__ import annotations

import types

from .errors import ConfigError, Problem
from .loading.plan import GRADIENT_CHECKPOINTING_VALUES
from .patch.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from .state import base_model_of, get_state


def _set_cache_and_padding(model, use_cache: bool, padding_side: str) -> None:
    base = base_model_of(model)
    base.config.use_cache = use_cache
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.use_cache = use_cache
    state = get_state(model)
    if state and state.tokenizer is not None:
        state.tokenizer.padding_side = padding_side


def for_training(model, use_gradient_checkpointing=None):
    """`use_gradient_checkpointing`: None keeps the model's setting (from from_pretrained / get_peft_model)."""
    state = get_state(model)
    mode = use_gradient_checkpointing
    if mode is None:
        mode = state.use_gradient_checkpointing if state else True
    elif mode not in GRADIENT_CHECKPOINTING_VALUES:
        raise ConfigError("FastLanguageModel.for_training", [Problem(
            "use_gradient_checkpointing", mode, "None, True, False or 'unsloth'", "use 'unsloth' or leave it None")])
    from .inference.attach import disable_fast_generate

    disable_fast_generate(model)
    model.train()
    trainable = any(p.requires_grad for p in model.parameters())
    if mode and trainable:
        enable_gradient_checkpointing(base_model_of(model), mode)
    else:
        disable_gradient_checkpointing(base_model_of(model))
    _set_cache_and_padding(model, use_cache=False, padding_side="right")
    return model


def for_inference(model):
    """Also gives trained embed_tokens / lm_head copies the model's dtype again (a TRL trainer may have cast them)."""
    from .lora import align_saved_module_dtypes

    align_saved_module_dtypes(model)
    model.eval()
    disable_gradient_checkpointing(base_model_of(model))
    _set_cache_and_padding(model, use_cache=True, padding_side="left")
    from .inference.attach import enable_fast_generate

    enable_fast_generate(model)
    return model


def attach_methods(model) -> None:
    """Bind fastlm's model methods onto this instance (and its PEFT wrapper, when given one)."""
    from .save_guard import install_save_guard

    for name, fn in (("for_training", for_training), ("for_inference", for_inference)):
        object.__setattr__(model, name, types.MethodType(fn, model))
    install_save_guard(model)
