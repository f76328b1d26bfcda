"""Tiled MLP (`unsloth_tiled_mlp=True`): run each decoder MLP over chunks of the sequence, recomputing each chunk
in the backward pass, so the intermediate (tokens x intermediate_size) activations of only one chunk are alive at
a time. Exact: the same function, chunked over positions (an MLP is position-wise)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .patchset import bind_forward, chain

DEFAULT_CHUNK_TOKENS = 4096
_SLOT = "_fastlm_tiled_mlp"


def tiled_forward(mlp_forward, hidden_states: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """hidden_states: (batch, seq, hidden). Splits the flattened tokens into chunks of `chunk_tokens`."""
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    if flat.shape[0] <= chunk_tokens:
        return mlp_forward(hidden_states)
    outs = []
    for chunk in flat.split(chunk_tokens, dim=0):
        if torch.is_grad_enabled() and chunk.requires_grad:
            outs.append(checkpoint(mlp_forward, chunk, use_reentrant=False))
        else:
            outs.append(mlp_forward(chunk))
    return torch.cat(outs, dim=0).reshape(*shape[:-1], -1)


@dataclass
class TiledState:
    """What a tiled MLP forward needs: the forward it tiles (bound to the module) and the chunk size."""

    inner: Callable
    chunk_tokens: int


def tiled_mlp_forward(self, x):
    state = getattr(self, _SLOT)
    return tiled_forward(state.inner, x, state.chunk_tokens)


def install_tiled_mlp(model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """Wrap the forward of every decoder layer's `mlp` on this instance (whatever forward it has now, fused ones
    included). Returns the undo, or None when the model has no `.mlp` modules."""
    undos = []
    for name, module in model.named_modules():
        if name.endswith(".mlp") and hasattr(module, "forward"):
            undos.append(bind_forward(module, tiled_mlp_forward, _SLOT, TiledState(module.forward, chunk_tokens)))
    return chain(undos)
