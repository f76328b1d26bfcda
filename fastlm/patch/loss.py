"""The training loss straight from the last hidden states (fused linear cross-entropy), never materialising the
[tokens, vocab] logits, installed on one `*ForCausalLM` instance.

The fused path runs when the forward is given `labels` with gradients enabled (a training step). Its output is a
real `CausalLMOutputWithPast` whose `logits` are computed from the kept hidden states the first time anybody asks
for them (`out.logits`, `out["logits"]`, `out[1]`, `out.to_tuple()`), so evaluation, `compute_metrics` and TRL's
token-accuracy metric still see real logits. Without labels, without gradients (evaluation, generation), with
`logits_to_keep`, or when lm_head is not a plain linear (LoRA on lm_head, quantized), the original forward runs.
The loss equals transformers' `ForCausalLMLoss` (ignore_index, `num_items_in_batch`, `shift_labels`, Gemma 2's
final logit soft-cap), so gradient accumulation stays exact.
"""
from __future__ import annotations

import collections
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from .patchset import bind_forward

_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
_SLOT = "_fastlm_fused_loss"


def _lazy_output_class():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class LazyLogitsCausalLMOutput(CausalLMOutputWithPast):
        """CausalLMOutputWithPast whose logits are computed on first access (same values as the plain forward)."""

        def _materialize(self) -> None:
            fn = self.__dict__.pop("_fastlm_logits_fn", None)
            if fn is None:
                return
            logits = fn()
            collections.OrderedDict.__setitem__(self, "logits", logits)
            object.__setattr__(self, "logits", logits)
            for key in [k for k in list(collections.OrderedDict.keys(self)) if k not in ("loss", "logits")]:
                collections.OrderedDict.move_to_end(self, key)

        def __getattribute__(self, name):
            if name == "logits":
                object.__getattribute__(self, "_materialize")()
            return object.__getattribute__(self, name)

    def _materializing(name):
        inner = getattr(CausalLMOutputWithPast, name)

        def method(self, *args):
            self._materialize()
            return inner(self, *args)

        method.__name__ = name
        return method

    # every way of reading an output's fields computes the logits first
    for name in ("__getitem__", "to_tuple", "keys", "values", "items", "__iter__", "__len__", "__contains__"):
        setattr(LazyLogitsCausalLMOutput, name, _materializing(name))
    return LazyLogitsCausalLMOutput


_LAZY_CLASS = None


def _linear_weight(module):
    """(weight, bias) of a plain linear lm_head, also behind PEFT's ModulesToSaveWrapper; None otherwise."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        if getattr(module, "disable_adapters", False) or not module.active_adapters:
            module = module.original_module
        elif len(module.active_adapters) == 1 and module.active_adapters[0] in module.modules_to_save:
            module = module.modules_to_save[module.active_adapters[0]]
        else:
            return None
    if type(module) is nn.Linear:
        return module.weight, module.bias
    return None


@dataclass
class FusedLossState:
    """The fused-loss forward's settings: the forward it replaces (bound to the model), the names of the class
    forward's positional parameters, and the final logit soft-cap (Gemma 2) or None."""

    inner: Callable
    params: list[str]
    softcap: float | None


def fused_loss_forward(self, *args, **kwargs):
    """`*ForCausalLM.forward`, bound to the model: the loss from the last hidden states while training with
    labels, the replaced forward otherwise (see the module docstring)."""
    state = getattr(self, _SLOT)
    for name, value in zip(state.params, args):
        kwargs[name] = value
    labels = kwargs.get("labels")
    weights = _linear_weight(self.lm_head)
    if labels is None or not torch.is_grad_enabled() or weights is None or kwargs.get("logits_to_keep"):
        return state.inner(**kwargs)
    kwargs.pop("labels")
    kwargs.pop("logits_to_keep", None)
    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state
    weight, bias = weights
    softcap = state.softcap
    shift_labels = loss_kwargs.get("shift_labels")
    loss = fused_linear_cross_entropy(hidden, weight, labels=labels if shift_labels is None else None,
                                      bias=bias, softcap=softcap,
                                      ignore_index=loss_kwargs.get("ignore_index", -100),
                                      num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
                                      shift_labels=shift_labels)
    lm_head = self.lm_head

    def logits():  # kept by this one output only, not by the model
        out = lm_head(hidden)
        if softcap is not None:
            out = torch.tanh(out / softcap) * softcap
        return out

    result = _LAZY_CLASS(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                         hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    object.__setattr__(result, "_fastlm_logits_fn", logits)
    return result.to_tuple() if return_dict is False else result


def install_fused_loss(model, arch) -> object | None:
    """Install on a `*ForCausalLM` with `.model` and `.lm_head` and a fastlm ArchConfig. Returns the undo."""
    global _LAZY_CLASS
    if arch is None or not hasattr(model, "lm_head") or not hasattr(model, "model") or \
            not type(model).__name__.endswith("ForCausalLM"):
        return None
    _LAZY_CLASS = _LAZY_CLASS or _lazy_output_class()
    params = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
    state = FusedLossState(model.forward, params, arch.final_logit_softcap)
    return bind_forward(model, _forward_for(type(model)), _SLOT, state)


@functools.lru_cache(maxsize=None)
def _forward_for(cls):
    """`fused_loss_forward` as a function of its own whose signature is `cls.forward`'s: Trainer keeps only the
    dataset columns `inspect.signature(model.forward)` names (remove_unused_columns) and checks it for loss
    kwargs, so the patched forward must show the class's parameters, not (*args, **kwargs). One per class, no
    closure: a deep copy of the model still rebinds it to the copy."""
    fn = types.FunctionType(fused_loss_forward.__code__, fused_loss_forward.__globals__, "forward",
                            fused_loss_forward.__defaults__, fused_loss_forward.__closure__)
    fn.__doc__, fn.__qualname__ = fused_loss_forward.__doc__, f"{cls.__name__}.forward (fastlm fused loss)"
    fn.__signature__ = inspect.signature(cls.forward)
    return fn
