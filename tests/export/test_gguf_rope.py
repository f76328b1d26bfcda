"""GGUF RoPE scaling: llama3 (rope_freqs), yarn and Phi-3 longrope models run in llama.cpp with the logits of the
HF model, over sequences long enough that the scaled (low) frequencies turn by a large angle; dynamic is refused."""
import math

import pytest
import torch

from fixtures.tiny import build_tokenizer, save_tiny_model

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

ORIG = 64  # the "pre-training" context of the tiny models; max_position_embeddings is 256
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIG}
YARN_SAME = dict(YARN, beta_fast=32.0, beta_slow=1.0, attention_factor=0.1 * math.log(4.0) + 1.0)  # the defaults
_gen = torch.Generator().manual_seed(1)
PHI_ORIG = 256
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": PHI_ORIG,
            "long_factor": (1 + 7 * torch.rand(8, generator=_gen)).tolist(),
            "short_factor": (1 + 0.5 * torch.rand(8, generator=_gen)).tolist()}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _long_ids(tok, n: int) -> list[int]:
    text = "The red cat is in the city of paris and the blue dog learns fast. " * 40
    ids = tok(text)["input_ids"][:n]
    assert len(ids) == n
    return ids


def _export(model_type, rope, tok, tmp_path, lora_model_factory, method="f32"):
    extra = {}
    if model_type.startswith("gemma"):  # per-layer-type RoPE; llama.cpp's Gemma has no separate output layer
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        extra = {"tie_word_embeddings": True}
    if model_type == "phi3":
        # Phi-3 reads its original context from the config, not rope_parameters; llama.cpp picks the long factors
        # when its context size (rounded up to 256) exceeds it, so the tiny Phi-3 is pre-trained on 256 of 1024
        extra = {"original_max_position_embeddings": PHI_ORIG, "max_position_embeddings": 1024}
    path = save_tiny_model(model_type, tmp_path / "src", tokenizer=tok, rope_parameters=rope, **extra)
    model, tok = lora_model_factory(path)
    report = model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=method)
    return model, tok, report, tmp_path / "g" / f"model.{method.upper()}.gguf"


def _max_diff_in_llama_cpp(model, path, ids, n_ctx):
    from fastlm.export.gguf.verify import _cpp_logits, load_llama
    from fastlm.export.verify import logits_of

    llm = load_llama(path, n_ctx=n_ctx)
    try:
        got = _cpp_logits(llm, ids)
    finally:
        llm.close()
    ref = logits_of(model, ids)
    return float((ref - got).abs().max()), float(ref.abs().max())


@pytest.mark.parametrize("model_type,rope", [("llama", LLAMA3), ("llama", YARN), ("qwen2", YARN),
                                             ("qwen3", YARN), ("gemma3_text", YARN),
                                             ("llama", YARN_SAME)],
                         ids=["llama3", "yarn", "qwen2-yarn", "qwen3-yarn", "gemma3-yarn", "yarn-explicit-defaults"])
def test_scaled_rope_matches_hf_over_long_sequence(model_type, rope, tokenizer, tmp_path, lora_model_factory):
    model, tok, report, path = _export(model_type, rope, tokenizer, tmp_path, lora_model_factory)
    assert report["checks"][0]["passed"], report["checks"][0]["problems"]
    ids = _long_ids(tok, 200)
    diff, scale = _max_diff_in_llama_cpp(model, path, ids, n_ctx=256)
    print(f"{model_type} {rope['rope_type']}: max |dlogit| {diff:.2e} (logit scale {scale:.2f})")
    assert diff < 1e-3 * max(1.0, scale)


def test_scaling_is_really_written(tokenizer, tmp_path, lora_model_factory):
    """The same weights exported without the llama3 scaling disagree with HF: the check above can fail."""
    import fastlm.export.gguf.rope as rope_mod

    model, tok, _, path = _export("llama", LLAMA3, tokenizer, tmp_path, lora_model_factory)
    ids = _long_ids(tok, 200)
    import gguf

    reader = gguf.GGUFReader(str(path))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.data.tolist()[0] == 1.0 and freqs.data.tolist()[-1] == 8.0
    real = rope_mod.llama3_rope_freqs
    try:
        rope_mod.llama3_rope_freqs = lambda config, params: real(config, params) * 0 + 1  # no scaling
        model.save_pretrained_gguf(tmp_path / "plain", tok, quantization_method="f32", verify=False)
    finally:
        rope_mod.llama3_rope_freqs = real
    diff, _ = _max_diff_in_llama_cpp(model, tmp_path / "plain" / "model.F32.gguf", ids, n_ctx=256)
    assert diff > 1e-2


def test_phi3_longrope(tokenizer, tmp_path, lora_model_factory):
    """Short factors while llama.cpp's context fits the original length (the export's check: short texts, n_ctx
    128), long ones in a longer context over a sequence past it (where transformers switches too)."""
    model, tok, report, path = _export("phi3", LONGROPE, tokenizer, tmp_path, lora_model_factory)
    assert model.config.rope_parameters["original_max_position_embeddings"] == PHI_ORIG
    assert report["checks"][0]["passed"], report["checks"][0]["problems"]
    ids = _long_ids(tok, 300)
    diff, scale = _max_diff_in_llama_cpp(model, path, ids, n_ctx=512)
    print(f"phi3 longrope (long factors): max |dlogit| {diff:.2e} (logit scale {scale:.2f})")
    assert diff < 1e-3
    mixed, _ = _max_diff_in_llama_cpp(model, path, ids[:100], n_ctx=512)  # llama.cpp long factors, HF short
    assert mixed > 1e-2


@pytest.mark.parametrize("rope,model_type,match", [
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "llama", "dynamic-NTK"),
    (LLAMA3, "qwen2", "rope_freqs"),
    (LONGROPE, "llama", "long/short"),
    (dict(YARN, beta_fast=16.0), "llama", "beta_fast"),
    (dict(YARN, attention_factor=1.3), "llama", "attention_factor"),
])
def test_unsupported_rope_is_refused_before_writing(rope, model_type, match, tokenizer, tmp_path,
                                                    lora_model_factory):
    from fastlm.errors import UnsupportedFeatureError

    path = save_tiny_model(model_type, tmp_path / "src", tokenizer=tokenizer, rope_parameters=rope)
    model, tok = lora_model_factory(path)
    with pytest.raises(UnsupportedFeatureError, match=match):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32", verify=False)
    assert not (tmp_path / "g").exists()
