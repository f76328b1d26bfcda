"""Install the engine on a model instance (never on a class).

`attach_inference_methods(model)`: binds `model.fast_generate` (call it for the base model and the PEFT wrapper).
`enable_fast_generate(model)`: `model.generate` becomes the engine-backed generate (transformers' contract);
`disable_fast_generate(model)` gives back exactly what was there before and drops the engine (its fused weight
copies and cache), so training sees the plain model. For a PEFT wrapper both the wrapper and the inner
transformers model are patched.
"""
from __future__ import annotations

import types

from ..state import base_model_of
from .engine import drop_engine

_ORIGINAL = "_fastlm_original_generate"


def attach_inference_methods(model) -> None:
    from .fast_generate import fast_generate

    object.__setattr__(model, "fast_generate", types.MethodType(fast_generate, model))


def _targets(model):
    base = base_model_of(model)
    return [model] if base is model else [model, base]


def enable_fast_generate(model):
    from .generate import engine_generate

    drop_engine(model)  # weights may have changed since the last engine was built
    for target in _targets(model):
        if _ORIGINAL in target.__dict__:
            continue
        had = "generate" in target.__dict__
        target.__dict__[_ORIGINAL] = (had, target.__dict__.get("generate"))
        original = target.generate

        def generate(self, inputs=None, *args, _original=original, **kwargs):
            if args:
                kwargs = dict(zip(("generation_config", "logits_processor", "stopping_criteria",
                                   "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "streamer"),
                                  args), **kwargs)
            return engine_generate(self, _original, inputs, **kwargs)

        generate.__doc__ = engine_generate.__doc__
        object.__setattr__(target, "generate", types.MethodType(generate, target))
    return model


def disable_fast_generate(model):
    for target in _targets(model):
        saved = target.__dict__.pop(_ORIGINAL, None)
        if saved is None:
            continue
        had, value = saved
        if had:
            object.__setattr__(target, "generate", value)
        else:
            target.__dict__.pop("generate", None)
    drop_engine(model)
    return model


def fast_generate_enabled(model) -> bool:
    return _ORIGINAL in model.__dict__
