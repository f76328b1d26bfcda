"""Backward through frozen FP8 linears (`load_in_fp8`), so LoRA can train on top of them.

torchao's FP8 weights run the forward on FP8 matrix units but have no derivative for `_scaled_mm`. The base weight
is frozen, so the backward needs only dL/dx = dL/dy @ W: computed here from the dequantized weight, one layer at a
time (the full-precision copy lives only inside the backward of that layer).
"""
from __future__ import annotations

import torch
from torch import nn

from .patchset import bind_forward, chain


class FP8FrozenLinearFunction(torch.autograd.Function):
    """y = linear_fp8(x) with dL/dx = dL/dy @ dequant(W); x: (..., in), W: (out, in)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        with torch.no_grad():
            return module._fastlm_fp8_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.module.weight
        dense = weight.dequantize() if hasattr(weight, "dequantize") else weight.float()
        return grad_out @ dense.to(grad_out.dtype), None


def _is_fp8_weight(weight) -> bool:
    return "float8" in type(weight).__name__.lower() or getattr(weight, "dtype", None) in (
        torch.float8_e4m3fn, torch.float8_e5m2)


def install_fp8_backward(model):
    """Patch every linear with an FP8 weight on this instance. Returns the undo, or None when there is none."""
    undos = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and _is_fp8_weight(module.weight) and \
                "_fastlm_fp8_forward" not in module.__dict__:
            undos.append(bind_forward(module, _fp8_frozen_forward, "_fastlm_fp8_forward", module.forward))
    return chain(undos)


def _fp8_frozen_forward(self, x):
    """The patched forward, bound to the linear itself (a deep copy of the model computes with its own weights)."""
    return FP8FrozenLinearFunction.apply(x, self)
