"""The attention forward of each decoder layer, per instance: projections (fused LoRA Q/K/V and O when
`fast_lora` serves them), q/k-norm, RoPE on q and k in one kernel launch, then transformers' own attention
function for the model's `attn_implementation` (SDPA / flash / eager, with the layer's sliding window, scale and
soft-cap). With a KV cache (generation) the original forward runs, so caching behaves exactly as in transformers."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from ..arch import get_path
from ..kernels.rope import apply_rope
from .patchset import bind_forward, chain

_SLOT = "_fastlm_attention"


def _attention_function(attn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attn).__module__].eager_attention_forward
    impl = attn.config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


class PackedSegments:
    """Sequence boundaries of a packed row (batch 1, `position_ids` restarting at 0 for each sequence), computed
    once per forward and shared by every layer (one host sync per distinct position_ids tensor)."""

    def __init__(self):
        self._key = None
        self._bounds = None

    def bounds(self, position_ids):
        """[(start, end), ...] for a packed single row, or None when the batch is not packed."""
        if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
            return None
        key = (id(position_ids), position_ids.data_ptr(), position_ids._version, position_ids.shape[1])
        if key != self._key:
            starts = (position_ids[0] == 0).nonzero().flatten().tolist()
            n = position_ids.shape[1]
            if len(starts) < 2 or starts[0] != 0:
                bounds = None
            else:
                bounds = list(zip(starts, starts[1:] + [n]))
            self._key, self._bounds = key, bounds
        return self._bounds


def packed_attention(q, k, v, bounds, scale):
    """Causal attention inside each packed sequence: q (1, hq, s, d), k/v (1, hkv, s, d) -> (1, s, hq, d).
    Each sequence runs SDPA with is_causal=True, so no (s x s) mask is built. cuDNN's SDPA is left out: it builds
    a graph for every new sequence length, and packed lengths change every step (measured on an H100: a packed
    Llama-3.2-1B step took ~1 s with it, against 1.4 ms of attention once the graphs exist)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                               scale=scale, enable_gqa=gqa) for a, b in bounds]
    return torch.cat(outs, dim=2).transpose(1, 2)


def _split_fused_qkv(qkv, arch):
    q_size = arch.num_heads * arch.head_dim
    kv_size = arch.num_kv_heads * arch.head_dim
    return qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]


def _plain_qkv(attn, x):
    arch = getattr(attn, _SLOT).arch
    if arch.fused_qkv:
        return _split_fused_qkv(getattr(attn, arch.fused_qkv)(x), arch)
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def _plain_o(attn, x):
    return attn.o_proj(x)


@dataclass
class AttentionState:
    """A fast attention forward's settings: the forward it replaces (bound to the attention module), the
    resolved ArchConfig, the layer's sliding window, the packed-row boundaries shared by all layers, and
    `projections`: (project_qkv(attn, x) -> (q, k, v), project_o(attn, x)) such as fused LoRA's, or None for the
    module's own projections."""

    inner: Callable
    arch: Any
    window: int | None
    segments: PackedSegments
    projections: tuple[Callable, Callable] | None = None


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                      **kwargs):
    """The forward of transformers' decoder attention modules, bound to the attention module. Packed rows
    (padding-free batches) attend within each sequence through `packed_attention` when the layer has no sliding
    window, no soft-cap and no attention dropout; everything else goes through transformers' attention function."""
    state = getattr(self, _SLOT)
    if past_key_values is not None or position_embeddings is None:
        return state.inner(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                           past_key_values=past_key_values, **kwargs)
    arch = state.arch
    project_qkv, project_o = state.projections or (_plain_qkv, _plain_o)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, arch.head_dim)
    q, k, v = project_qkv(self, hidden_states)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    if arch.qk_norm_names:
        q_norm, k_norm = (getattr(self, n) for n in arch.qk_norm_names)
        q, k = q_norm(q), k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rope(q, k, cos, sin)
    can_pack = state.window is None and not arch.attn_logit_softcap and not (self.training and self.attention_dropout)
    bounds = state.segments.bounds(kwargs.get("position_ids")) if can_pack else None
    if bounds is not None:
        out = packed_attention(q, k, v, bounds, arch.attention_scale)
        return project_o(self, out.reshape(*input_shape, -1).contiguous()), None
    extra = {"softcap": arch.attn_logit_softcap} if arch.attn_logit_softcap else {}
    out, weights = _attention_function(self)(
        self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
        scaling=arch.attention_scale, sliding_window=state.window, **extra, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return project_o(self, out), weights


def install_fast_attention(model, arch, projections=None):
    """Install on every decoder layer's attention. `projections`: (project_qkv(attn, x), project_o(attn, x)) to
    use instead of the module's q/k/v and o projections (fused LoRA's `lora_qkv` / `lora_o`), or None. Returns
    the undo, or None without an ArchConfig."""
    if arch is None:
        return None
    if projections is not None and (len(projections) != 2 or not all(callable(p) for p in projections)):
        raise TypeError(f"projections={projections!r}: a pair (project_qkv(attn, x), project_o(attn, x)) or None")
    undos = []
    segments = PackedSegments()
    for idx, layer in enumerate(get_path(model, arch.layers_path)):
        attn = getattr(layer, arch.attention_name)
        state = AttentionState(attn.forward, arch, arch.sliding_window[idx], segments,
                               None if projections is None else tuple(projections))
        undos.append(bind_forward(attn, attention_forward, _SLOT, state))
    return chain(undos)
