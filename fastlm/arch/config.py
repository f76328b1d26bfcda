"""ArchSpec + a transformers config -> `ArchConfig`: the concrete numbers the fast paths take as plain arguments.

Kernels and patches never read the spec or the HF config themselves: they get norm eps/offset/casting, the
activation, RoPE per layer, attention scale, soft-caps, sliding window per layer, embedding scale and the module
paths from here. `resolve(spec, config)` reads the config as transformers >= 5.17 writes it (`rope_parameters`,
`layer_types`); values are checked against the loaded modules by the per-family conformance test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

NormCast = Literal["llama", "gemma"]  # llama: (x_f32 normalised).to(dtype) * w; gemma: (x_f32 * (1 + w_f32)).to(dtype)


@dataclass(frozen=True)
class RopeConfig:
    """RoPE of one layer: `rope_type` and its parameters as transformers reads them (theta, factor, ...);
    `rotary_dim` of the head's `head_dim` dimensions rotate (rotate-half layout), the rest pass through."""

    rope_type: str
    theta: float
    rotary_dim: int
    head_dim: int
    parameters: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def partial(self) -> bool:
        return self.rotary_dim < self.head_dim


@dataclass(frozen=True)
class ArchConfig:
    """Everything a fast path needs of one loaded model, as plain values. Paths are attribute paths from the
    top-level `*ForCausalLM` (or `*ForConditionalGeneration`) module; layer-relative names are per decoder layer."""

    family: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    # norms
    norm_eps: float
    norm_offset: float  # 1.0 for Gemma's (1 + w)
    norm_cast: NormCast
    layer_norm_names: tuple[str, ...]
    # MLP
    activation: Literal["silu", "gelu_tanh", "gelu"]
    # attention
    attention_scale: float
    qk_norm_names: tuple[str, str] | None  # (q_norm, k_norm) per-head RMSNorm modules inside the attention module
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    sliding_window: tuple[int | None, ...]  # per layer; None = full attention
    rope: tuple[RopeConfig, ...]  # per layer
    # embeddings and output
    embedding_scale: float | None  # multiply embeddings by this (Gemma: sqrt(hidden_size)); None = no scale
    tie_word_embeddings: bool
    embed_path: str
    final_norm_path: str
    lm_head_path: str
    layers_path: str
    attention_name: str
    mlp_name: str
    fused_qkv: str | None  # Phi-3: "qkv_proj"
    fused_gate_up: str | None  # Phi-3: "gate_up_proj"


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu"}


class ArchConfigError(ValueError):
    """The config has a value the fast paths do not handle; the model still runs through the plain HF forward."""


def _text_config(config):
    text = getattr(config, "text_config", None)
    return text if text is not None and getattr(config, "model_type", "") != getattr(text, "model_type", "") \
        else config


def _activation(text) -> str:
    name = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None) or "silu"
    if name not in _ACTIVATIONS:
        raise ArchConfigError(f"activation {name!r} has no fast path (known: {', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[name]


def _rope_per_layer(text, layer_types: list[str], head_dim: int) -> tuple[RopeConfig, ...]:
    params = getattr(text, "rope_parameters", None) or {}
    if not params and getattr(text, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": text.rope_theta}
    nested = bool(params) and all(isinstance(v, dict) for v in params.values())
    out = []
    for layer_type in layer_types:
        p = dict(params.get(layer_type) or params.get("full_attention") or {}) if nested else dict(params)
        factor = p.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None)) or 1.0
        rotary_dim = int(head_dim * float(factor))
        rotary_dim -= rotary_dim % 2
        out.append(RopeConfig(rope_type=p.get("rope_type", "default"), theta=float(p.get("rope_theta", 10000.0)),
                              rotary_dim=rotary_dim, head_dim=head_dim, parameters=p))
    return tuple(out)


def _layer_types(text, spec, n: int) -> list[str]:
    types = getattr(text, "layer_types", None)
    if types:
        return list(types)[:n]
    window = getattr(text, spec.sliding_window_attr, None) if spec.sliding_window_attr else None
    return ["sliding_attention" if window else "full_attention"] * n


def resolve(spec, config) -> ArchConfig:
    """Concrete values for one model of `spec`'s family. Raises ArchConfigError for values without a fast path."""
    text = _text_config(config)
    n_layers = int(text.num_hidden_layers)
    n_heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // n_heads)
    layer_types = _layer_types(text, spec, n_layers)
    window = getattr(text, spec.sliding_window_attr, None) if spec.sliding_window_attr else None
    sliding = tuple(int(window) if t == "sliding_attention" and window else None for t in layer_types)
    scalar = getattr(text, "query_pre_attn_scalar", None)
    gemma_norm = spec.norm == "rms_plus_one"
    prefix = spec.text_prefix.get(getattr(config, "model_type", ""), "model")

    def softcap(attr):
        value = getattr(text, attr, None) if attr else None
        return float(value) if value else None

    return ArchConfig(
        family=spec.family, model_type=str(getattr(text, "model_type", "")), hidden_size=hidden,
        intermediate_size=int(text.intermediate_size), num_layers=n_layers, num_heads=n_heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads), head_dim=head_dim,
        vocab_size=int(text.vocab_size),
        norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)), norm_offset=1.0 if gemma_norm else 0.0,
        norm_cast="gemma" if gemma_norm else "llama", layer_norm_names=tuple(spec.norm_names),
        activation=_activation(text),
        attention_scale=float(scalar) ** -0.5 if scalar else head_dim ** -0.5,
        qk_norm_names=("q_norm", "k_norm") if spec.qk_norm else None,
        attn_logit_softcap=softcap(spec.attn_logit_softcap_attr),
        final_logit_softcap=softcap(spec.final_logit_softcap_attr),
        sliding_window=sliding, rope=_rope_per_layer(text, layer_types, head_dim),
        embedding_scale=math.sqrt(hidden) if spec.embedding_scale == "sqrt_hidden" else None,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
        embed_path=f"{prefix}.embed_tokens", final_norm_path=f"{prefix}.norm", lm_head_path="lm_head",
        layers_path=f"{prefix}.layers", attention_name=spec.attention_path, mlp_name=spec.mlp_path,
        fused_qkv=spec.fused_linear_aliases.get("q_proj"), fused_gate_up=spec.fused_linear_aliases.get("gate_proj"),
    )


def get_path(model, path: str):
    """`model.a.b.c` for path "a.b.c"; AttributeError names the missing step."""
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(obj).__name__} has no {part!r} (resolving {path!r} on "
                                 f"{type(model).__name__})")
        obj = getattr(obj, part)
    return obj
