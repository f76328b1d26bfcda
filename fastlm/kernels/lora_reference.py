"""Pure-torch references of the fused LoRA functions in kernels/lora.py, differentiated by autograd.

Each projection is (weight (out, in), bias (out,) or None, A (r, in), B (out, r), scale); weights are dense
(dequantize 4-bit weights first). Everything runs in x's dtype, as the fused functions do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(x: torch.Tensor, weight, bias, A, B, scale: float) -> torch.Tensor:
    """x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ; x: (..., in) -> (..., out)."""
    dt = x.dtype
    base = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))
    return base + F.linear(F.linear(x, A.to(dt)), B.to(dt)) * scale


def activation_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    """silu, gelu (erf) or gelu_tanh, as transformers' ACT2FN computes them."""
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu":
        return F.gelu(g)
    if activation == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    raise ValueError(f"activation={activation!r}: one of 'silu', 'gelu', 'gelu_tanh'")


def lora_mlp_reference(x: torch.Tensor, gate, up, down, activation: str) -> torch.Tensor:
    """down(act(gate(x)) * up(x)); gate/up/down: (weight, bias, A, B, scale) tuples."""
    h = activation_reference(lora_linear_reference(x, *gate), activation) * lora_linear_reference(x, *up)
    return lora_linear_reference(h, *down)
