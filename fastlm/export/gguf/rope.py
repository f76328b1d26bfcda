"""RoPE scaling in GGUF: the transformers `rope_parameters` of a model written as llama.cpp's keys and tensors.

- default / linear: `rope.freq_base`, and for linear `rope.scaling.type=linear` + `rope.scaling.factor`.
- llama3 (Llama 3.1+): no scaling type; llama.cpp divides each RoPE frequency by the matching entry of the
  `rope_freqs` tensor ([rope_dim / 2]); the entries are the per-frequency divisors of transformers' llama3 rule
  (1 for short wavelengths, `factor` for long ones, a smooth blend between).
- yarn: `rope.scaling.type=yarn`, `factor`, `original_context_length`. llama.cpp (as llama-cpp-python runs it)
  uses beta_fast=32, beta_slow=1 and scales cos/sin by 1 + 0.1 ln(factor) whatever `yarn_beta_*` /
  `yarn_attn_factor` keys say, which is transformers' default; other betas or attention factors are refused.
- longrope (Phi-3): `rope.scaling.type=longrope`, `rope.scaling.attn_factor`, `original_context_length`, and the
  `rope_factors_long` / `rope_factors_short` tensors. llama.cpp picks the long factors when its context size
  (n_ctx, rounded up to 256) exceeds the original context length, transformers when the sequence does: a short
  prompt in a long llama.cpp context gets the long factors.
- dynamic (dynamic NTK): llama.cpp cannot compute it, so it is refused.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import UnsupportedFeatureError

_FIX = "Fix: export with save_pretrained_merged and serve it with transformers or vLLM."
# llama.cpp architectures that load a rope_freqs / rope_factors_* tensor
_FREQS_ARCHS = ("LLAMA",)
_LONGROPE_ARCHS = ("PHI3",)


def rope_parameters(config) -> tuple[dict, dict | None]:
    """(global RoPE parameters, sliding-window RoPE parameters or None) from a transformers 5 config."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return params.get("full_attention", next(iter(params.values()))), params.get("sliding_attention")
    if not params and getattr(config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_theta}
    return params, None


def rope_dim(config, params: dict) -> int:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    return int(hd * partial)


def _original_context(config, params: dict, kind: str) -> int:
    orig = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if not orig:
        raise UnsupportedFeatureError(
            f"{kind} RoPE scaling needs original_max_position_embeddings in the model's rope_parameters; this config "
            f"has none ({params}). Fix: set it (the context length the model was pre-trained with).")
    return int(orig)


def llama3_rope_freqs(config, params: dict) -> np.ndarray:
    """Per-frequency divisors of the llama3 rule: wavelengths shorter than original/high_freq_factor keep their
    frequency, longer than original/low_freq_factor are divided by `factor`, those between are blended."""
    dim, base = rope_dim(config, params), float(params.get("rope_theta", 10000.0))
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    orig = _original_context(config, params, "llama3")
    out = np.empty(dim // 2, dtype=np.float32)
    for i in range(dim // 2):
        wavelen = 2 * math.pi * base ** (2 * i / dim)
        if wavelen < orig / high:
            out[i] = 1.0
        elif wavelen > orig / low:
            out[i] = factor
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return out


def _yarn_default_attention(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn_factor(config, params: dict) -> float:
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / _original_context(config, params, "yarn")
    return float(factor)


def _refuse(config, kind: str, why: str):
    raise UnsupportedFeatureError(
        f"GGUF export of {config.model_type} with rope_type={kind!r}: {why}. {_FIX}")


def write_rope(writer, config, arch: str) -> None:
    """Write the RoPE keys (freq base, dimension count, scaling) for llama.cpp architecture `arch`."""
    import gguf

    rope, rope_swa = rope_parameters(config)
    writer.add_rope_dimension_count(rope_dim(config, rope))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope_swa is not None:
        writer.add_rope_freq_base_swa(float(rope_swa.get("rope_theta", 10000.0)))
        if rope_swa.get("rope_type", "default") != "default":
            _refuse(config, rope_swa["rope_type"], "llama.cpp scales only the global layers' RoPE, not the "
                    "sliding-window layers'")
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3":
        if arch not in _FREQS_ARCHS:
            _refuse(config, kind, f"llama.cpp reads the llama3 frequency factors (rope_freqs) only for "
                    f"{list(_FREQS_ARCHS)} architectures, not {arch}")
        _original_context(config, rope, kind)  # fails before the write when missing
    elif kind == "yarn":
        if arch in _LONGROPE_ARCHS:
            _refuse(config, kind, "fastlm writes Phi-3 RoPE scaling only as longrope")
        if rope.get("truncate", True) is False:
            _refuse(config, kind, "truncate=False (an unrounded correction range); llama.cpp always rounds it")
        if rope.get("mscale") and rope.get("mscale_all_dim") and rope.get("attention_factor") is None:
            _refuse(config, kind, "mscale / mscale_all_dim attention scaling (DeepSeek style) is not the llama.cpp "
                    "LLaMA-family YaRN")
        factor = _yarn_factor(config, rope)
        custom = {k: rope[k] for k, default in (("beta_fast", 32.0), ("beta_slow", 1.0))
                  if rope.get(k) not in (None, default)}
        attn = rope.get("attention_factor")
        if attn is not None and abs(float(attn) - _yarn_default_attention(factor)) > 1e-6:
            custom["attention_factor"] = attn
        if custom:
            _refuse(config, kind, f"non-default {custom}; llama.cpp (checked through llama-cpp-python 0.3) applies "
                    "beta_fast=32, beta_slow=1 and attention factor 1 + 0.1 ln(factor) whatever the file says")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(_original_context(config, rope, kind))
    elif kind in ("longrope", "su"):
        if arch not in _LONGROPE_ARCHS:
            _refuse(config, kind, f"llama.cpp reads long/short RoPE factors only for {list(_LONGROPE_ARCHS)}")
        orig = _original_context(config, rope, kind)
        factor = rope.get("factor") or config.max_position_embeddings / orig
        attn = rope.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_attn_factors(float(attn))
        writer.add_rope_scaling_orig_ctx_len(orig)
    elif kind == "dynamic":
        _refuse(config, kind, "llama.cpp has no dynamic-NTK RoPE (frequencies recomputed from the sequence "
                "length at run time), so the GGUF would compute something else past the original context")
    else:
        _refuse(config, kind, "llama.cpp has no equivalent; supported: default, linear, llama3, yarn, longrope")


def rope_tensors(config, arch: str):
    """Extra `(gguf name, float32 array)` tensors the RoPE scaling needs (none for most)."""
    import gguf

    rope, _ = rope_parameters(config)
    kind = rope.get("rope_type", "default")
    name = gguf.TENSOR_NAMES
    if kind == "llama3":
        yield name[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_freqs(config, rope)
    elif kind in ("longrope", "su"):
        half = rope_dim(config, rope) // 2
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            values = np.asarray(rope[key], dtype=np.float32)
            if values.shape != (half,):
                raise UnsupportedFeatureError(
                    f"longrope {key} has {values.shape[0]} entries; a RoPE dimension of {2 * half} needs {half}. "
                    "Fix: correct the model's rope_parameters.")
            yield name[tensor] + ".weight", values
