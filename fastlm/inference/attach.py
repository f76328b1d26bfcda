"""Install the engine on a model instance (never on a class).

`attach_inference_methods(model)`: binds `model.fast_generate` (call it for the base model and the PEFT wrapper)
and the training-time generate (train_generate.py: a trainer's generation step, e.g. TRL's GRPO, on the engine).
`enable_fast_generate(model)`: `model.generate` becomes the engine-backed generate (transformers' contract);
`disable_fast_generate(model)` gives back exactly what was there before and drops the engine (its fused weight
copies and cache), so training sees the plain model. For a PEFT wrapper both the wrapper and the inner
transformers model are patched.
"""
from __future__ import annotations

import types

from .engine import drop_engine
from .generate import engine_generate
from .train_generate import (generate_targets, install_training_generate, is_training_generate,
                             positional_to_kwargs, put_back_generate, release_training_engine)

_ORIGINAL = "_fastlm_original_generate"


def attach_inference_methods(model) -> None:
    from .fast_generate import fast_generate

    object.__setattr__(model, "fast_generate", types.MethodType(fast_generate, model))
    if not fast_generate_enabled(model):  # else it is under the engine's generate already, or comes back with
        install_training_generate(model)  # disable_fast_generate


def _previous_generate(target):
    """The generate `target` had before `enable_fast_generate`, bound to `target` (read at call time from the
    instance, so that a deep copy of the model calls its own)."""
    had, own = target.__dict__[_ORIGINAL]
    return own if had else types.MethodType(type(target).generate, target)


def engine_backed_generate(self, inputs=None, *args, **kwargs):
    original = _previous_generate(self)
    if self.training and is_training_generate(original):  # a trainer's step: weights change between calls
        return original(inputs, *args, **kwargs)
    return engine_generate(self, original, inputs, **positional_to_kwargs(args, kwargs))


engine_backed_generate.__doc__ = engine_generate.__doc__


def enable_fast_generate(model):
    drop_engine(model)  # weights may have changed since the last engine was built
    release_training_engine(model)  # training is over: its engine's cache is not needed
    for target in generate_targets(model):
        if _ORIGINAL in target.__dict__:
            continue
        target.__dict__[_ORIGINAL] = ("generate" in target.__dict__, target.__dict__.get("generate"))
        # bound to the instance, everything read from it: copy.deepcopy rebinds it to the copy
        object.__setattr__(target, "generate", types.MethodType(engine_backed_generate, target))
    return model


def disable_fast_generate(model):
    for target in generate_targets(model):
        saved = target.__dict__.pop(_ORIGINAL, None)
        if saved is None:
            continue
        put_back_generate(target, *saved)
    drop_engine(model)
    release_training_engine(model)
    return model


def fast_generate_enabled(model) -> bool:
    return _ORIGINAL in model.__dict__
