"""Conformance of `ArchSpec.resolve(config)` per registered family, on its tiny model: every path resolves, and
the resolved numbers (norm, activation, attention scale, soft-caps, sliding windows, RoPE, embedding scale) are
the ones the loaded transformers modules actually use."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastlm.arch import get_path, lookup
from fixtures.tiny import FAMILY_MODEL_TYPES, tiny_config

ACT = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
       "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def _model(model_type, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=320, **overrides))
    with torch.no_grad():  # make norm weights non-trivial so the (1 + w) offset and casting show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def _rms(x, w, eps, offset, cast):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "gemma":
        return (normed * (offset + w.float())).to(x.dtype)
    return (offset + w) * normed.to(x.dtype)


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_resolved_config_matches_the_loaded_modules(model_type):
    model = _model(model_type)
    cfg = lookup(model_type).resolve(model.config)
    layers = get_path(model, cfg.layers_path)
    assert len(layers) == cfg.num_layers
    assert get_path(model, cfg.embed_path) is model.get_input_embeddings()
    assert get_path(model, cfg.lm_head_path) is model.get_output_embeddings()
    final_norm = get_path(model, cfg.final_norm_path)

    x = torch.randn(3, 5, cfg.hidden_size).to(torch.bfloat16)
    for layer_idx, layer in enumerate(layers):
        norms = [getattr(layer, n) for n in cfg.layer_norm_names] + [final_norm]
        for norm in norms:
            expect = norm.to(torch.bfloat16)(x)
            got = _rms(x, norm.weight.data, cfg.norm_eps, cfg.norm_offset, cfg.norm_cast)
            assert torch.equal(got, expect), (type(norm).__name__, cfg.norm_cast)
            norm.float()
        attn = getattr(layer, cfg.attention_name)
        assert math.isclose(attn.scaling, cfg.attention_scale)
        assert getattr(attn, "sliding_window", None) == cfg.sliding_window[layer_idx]
        assert getattr(attn, "attn_logit_softcapping", None) == cfg.attn_logit_softcap
        if cfg.qk_norm_names:
            for n in cfg.qk_norm_names:
                norm = getattr(attn, n)
                h = torch.randn(2, 3, cfg.head_dim)
                assert torch.allclose(norm(h), _rms(h, norm.weight.data, cfg.norm_eps, cfg.norm_offset, cfg.norm_cast))
        projections = (cfg.fused_qkv,) if cfg.fused_qkv else ("q_proj", "k_proj", "v_proj")
        for n in projections + ("o_proj",):
            assert isinstance(getattr(attn, n), torch.nn.Linear)
        mlp = getattr(layer, cfg.mlp_name)
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn")
        h = torch.randn(50) * 4
        assert torch.allclose(act(h), ACT[cfg.activation](h), atol=1e-6)
    assert model.config.final_logit_softcapping if cfg.final_logit_softcap else True
    assert cfg.final_logit_softcap == getattr(model.config, "final_logit_softcapping", None)

    # RoPE: the model's rotary module gives cos of width rotary_dim for every layer type
    rotary = get_path(model, cfg.layers_path.rsplit(".", 1)[0] + ".rotary_emb")
    pos = torch.arange(7)[None]
    for layer_idx, rope in enumerate(cfg.rope):
        kwargs = {}
        if getattr(model.config, "layer_types", None) and isinstance(model.config.rope_parameters.get(
                model.config.layer_types[layer_idx]), dict):
            kwargs["layer_type"] = model.config.layer_types[layer_idx]
        cos, _ = rotary(x.float(), pos, **kwargs)
        assert cos.shape[-1] == rope.rotary_dim
        inv_freq = 1.0 / rope.theta ** (torch.arange(0, rope.rotary_dim, 2).float() / rope.rotary_dim)
        assert rope.rope_type == "default"
        assert torch.allclose(cos[0, 3, : rope.rotary_dim // 2], torch.cos(3 * inv_freq), atol=1e-5)

    # embedding scale
    ids = torch.tensor([[5, 9, 11]])
    raw = model.get_input_embeddings().weight[ids]
    embedded = model.get_input_embeddings()(ids)
    scale = cfg.embedding_scale or 1.0
    if cfg.embedding_scale and not torch.allclose(embedded, raw * scale):  # scaled in the model body instead
        assert torch.allclose(embedded, raw)
    else:
        assert torch.allclose(embedded, raw * scale)


def test_sliding_window_per_layer_and_partial_rotary_come_from_the_config():
    mistral = lookup("mistral").resolve(tiny_config("mistral", vocab_size=320, sliding_window=32))
    assert mistral.sliding_window == (32, 32)
    gemma2 = lookup("gemma2").resolve(tiny_config("gemma2", vocab_size=320))
    assert gemma2.sliding_window == (64, None) and gemma2.attn_logit_softcap == 50.0
    assert gemma2.final_logit_softcap == 30.0 and gemma2.attention_scale == 16 ** -0.5
    gemma3 = lookup("gemma3_text").resolve(tiny_config("gemma3_text", vocab_size=320, num_hidden_layers=6))
    assert [r.theta for r in gemma3.rope] == [10000.0] * 5 + [1000000.0]
    assert gemma3.sliding_window == (64,) * 5 + (None,)

    model = _model("phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5})
    cfg = lookup("phi3").resolve(model.config)
    assert cfg.rope[0].rotary_dim == cfg.head_dim // 2 and cfg.rope[0].partial
    cos, _ = model.model.rotary_emb(torch.randn(1, 3, 64), torch.arange(3)[None])
    assert cos.shape[-1] == cfg.rope[0].rotary_dim
    assert cfg.fused_qkv == "qkv_proj" and cfg.fused_gate_up == "gate_up_proj"


def test_gemma3_multimodal_model_keeps_its_text_decoder_under_language_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=320),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config)
    cfg = lookup(config.model_type).resolve(config)
    assert get_path(model, cfg.layers_path) is model.model.language_model.layers
    assert get_path(model, cfg.embed_path) is model.get_input_embeddings()
    assert get_path(model, cfg.lm_head_path) is model.get_output_embeddings()
    assert cfg.num_layers == 2 and cfg.head_dim == 16 and cfg.norm_offset == 1.0
