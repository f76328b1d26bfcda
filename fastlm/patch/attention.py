"""The attention forward of each decoder layer, per instance: projections (fused LoRA Q/K/V and O when
`fast_lora` serves them), q/k-norm, RoPE on q and k in one kernel launch, then transformers' own attention
function for the model's `attn_implementation` (SDPA / flash / eager, with the layer's sliding window, scale and
soft-cap). With a KV cache (generation) the original forward runs, so caching behaves exactly as in transformers."""
from __future__ import annotations

import sys

from ..arch import get_path
from .patchset import chain, replace_attr


def _attention_function(attn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attn).__module__].eager_attention_forward
    impl = attn.config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def _split_fused_qkv(qkv, arch):
    q_size = arch.num_heads * arch.head_dim
    kv_size = arch.num_kv_heads * arch.head_dim
    return qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]


def _plain_qkv(attn, x, arch):
    if arch.fused_qkv:
        return _split_fused_qkv(getattr(attn, arch.fused_qkv)(x), arch)
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def _plain_o(attn, x):
    return attn.o_proj(x)


def make_attention_forward(attn, arch, layer_idx: int, project_qkv=None, project_o=None):
    """A forward with the signature of transformers' decoder attention modules."""
    from ..kernels.rope import apply_rope

    original = attn.forward
    project_qkv = project_qkv or (lambda x: _plain_qkv(attn, x, arch))
    project_o = project_o or (lambda x: _plain_o(attn, x))
    head_dim = arch.head_dim
    window = arch.sliding_window[layer_idx]
    extra = {"softcap": arch.attn_logit_softcap} if arch.attn_logit_softcap else {}
    q_norm, k_norm = (getattr(attn, n) for n in arch.qk_norm_names) if arch.qk_norm_names else (None, None)

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is not None or position_embeddings is None:
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                            past_key_values=past_key_values, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, head_dim)
        q, k, v = project_qkv(hidden_states)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        out, weights = _attention_function(attn)(
            attn, q, k, v, attention_mask, dropout=attn.attention_dropout if attn.training else 0.0,
            scaling=arch.attention_scale, sliding_window=window, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return project_o(out), weights

    return forward


def install_fast_attention(model, arch, fused_lora=None):
    """Install on every decoder layer's attention. `fused_lora(attn)` may return (project_qkv, project_o) for
    LoRA layers it can fuse, or None. Returns the undo, or None without an ArchConfig."""
    if arch is None:
        return None
    undos = []
    for idx, layer in enumerate(get_path(model, arch.layers_path)):
        attn = getattr(layer, arch.attention_name)
        projections = fused_lora(attn) if fused_lora is not None else None
        forward = make_attention_forward(attn, arch, idx, *(projections or ()))
        undos.append(replace_attr(attn, "forward", forward))
    return chain(undos)
