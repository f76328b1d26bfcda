"""Named real model shapes for benchmarks: random weights, the real architecture's sizes.

`shape_config(name)` returns a transformers config; the weights are random, so no download is needed. The sizes
are the published configs of those models.
"""
from __future__ import annotations

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gemma-2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # a few-MB model of the Llama layout for CPU tests of the benchmark commands themselves
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def shape_names() -> list[str]:
    return list(SHAPES)


def shape_config(name: str, **overrides):
    """A transformers config of the named shape (random-weight benchmarks). Unknown names list the known ones."""
    from transformers import AutoConfig

    from ..errors import ConfigError, Problem

    if name not in SHAPES:
        raise ConfigError("fastlm bench", [Problem("shape", name, f"one of {', '.join(SHAPES)}",
                                                   "pick a listed shape")])
    kw = dict(SHAPES[name])
    model_type = kw.pop("model_type")
    kw.update(overrides)
    return AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, **kw)
