"""The gated MLP of every decoder layer through fastlm's SwiGLU / GeGLU kernel (kernels/activations.py), per
instance: `down_proj(act(gate_proj(x)) * up_proj(x))` (Phi-3: `gate_up_proj(x)` split in two) with `act(g) * u`
computed by `GatedActivationFunction` (one launch forward, one backward, fp32 math, only g and u saved) instead of
transformers' activation module and a separate multiply.

This is the MLP of full fine-tuning and of MLPs without LoRA: the projections are called as the modules they are
(plain, quantized, FP8 or single LoRA linears fused by `fast_lora`), so weights, state_dict, optimizer state and
PEFT are untouched. MLPs whose gate, up and down are all LoRA layers are left to `fast_lora`'s fused LoRA MLP
(installed before this patch, it owns their forward; they are skipped here). As with fused LoRA, the kernel runs
while autograd records (training); under no_grad / inference_mode the module's own forward runs. On CPU the
kernel call dispatches to the torch reference (kernels/_triton.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..arch import get_path
from ..kernels.activations import geglu, swiglu
from .patchset import bind_forward, chain

_GELU = {"gelu": "none", "gelu_tanh": "tanh"}
_SLOT = "_fastlm_gated_mlp"


def gated(g: torch.Tensor, u: torch.Tensor, activation: str, inplace_backward: bool) -> torch.Tensor:
    """act(g) * u for the resolved activation name (silu, gelu, gelu_tanh)."""
    if activation == "silu":
        return swiglu(g, u, inplace_backward=inplace_backward)
    return geglu(g, u, _GELU[activation], inplace_backward=inplace_backward)


def _owns_output(linear) -> bool:
    """True when nothing but this MLP can read the projection's output, so the kernel's backward may write the
    gradients into its storage: a plain nn.Linear with its class forward and no hooks (its autograd node saves
    its input, not its output)."""
    return (type(linear) is nn.Linear and "forward" not in linear.__dict__ and not linear._forward_hooks
            and not linear._forward_pre_hooks)


@dataclass
class GatedMLPState:
    """A fast MLP forward's settings: the forward it replaces (bound to the MLP), the activation name, and the
    name of Phi-3's fused gate_up projection (None for separate gate_proj / up_proj)."""

    inner: Callable
    activation: str
    fused_gate_up: str | None


def gated_mlp_forward(self, x, *args, **kwargs):
    """The forward of transformers' gated MLPs (one hidden_states argument), bound to the MLP module."""
    state = getattr(self, _SLOT)
    if args or kwargs or not torch.is_grad_enabled():
        return state.inner(x, *args, **kwargs)
    if state.fused_gate_up is not None:
        gate_up = getattr(self, state.fused_gate_up)
        g, u = gate_up(x).chunk(2, dim=-1)
        inplace = _owns_output(gate_up)
    else:
        g, u = self.gate_proj(x), self.up_proj(x)
        inplace = _owns_output(self.gate_proj) and _owns_output(self.up_proj)
    return self.down_proj(gated(g, u, state.activation, inplace))


def _has_projections(mlp, fused_gate_up: str | None) -> bool:
    names = (fused_gate_up, "down_proj") if fused_gate_up else ("gate_proj", "up_proj", "down_proj")
    return all(isinstance(getattr(mlp, n, None), nn.Module) for n in names)


def install_fast_mlp(model, arch):
    """Install on every decoder layer's MLP whose forward no other patch owns. Returns the undo, or None without an
    ArchConfig (or when every MLP is taken, e.g. by fused LoRA)."""
    if arch is None or arch.activation not in ("silu", *_GELU):
        return None
    undos = []
    for layer in get_path(model, arch.layers_path):
        mlp = getattr(layer, arch.mlp_name)
        if "forward" in mlp.__dict__ or not _has_projections(mlp, arch.fused_gate_up):
            continue
        state = GatedMLPState(mlp.forward, arch.activation, arch.fused_gate_up)
        undos.append(bind_forward(mlp, gated_mlp_forward, _SLOT, state))
    return chain(undos)
