"""GGUF export: transformers reads the f32 file back with the same logits; llama.cpp loads every file and agrees
with the HF model (f32 within 1e-3, q8_0 small KL, K-quants reported); Modelfile; missing extras."""
import json

import pytest
import torch

from fixtures.tiny import FAMILY_MODEL_TYPES


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


TIED = {"gemma": {"tie_word_embeddings": True}, "gemma2": {"tie_word_embeddings": True},
        "gemma3_text": {"tie_word_embeddings": True}}  # llama.cpp's Gemma layouts have no separate output layer
# transformers' GGUF reader has no gemma, drops qwen3's key_length, and reads gemma2/gemma3 differently from
# llama.cpp, so those are checked in llama.cpp only
TRANSFORMERS_READS = ["llama", "mistral", "qwen2", "phi3"]


@pytest.mark.parametrize("model_type", TRANSFORMERS_READS)
def test_f32_gguf_read_back_by_transformers(model_type, tiny_model_factory, lora_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = lora_model_factory(tiny_model_factory(model_type, **TIED.get(model_type, {})))
    model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32", verify=False)
    try:
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.F32.gguf", dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        pytest.skip(f"transformers cannot read {model_type} GGUF: {exc}")
    ids = torch.tensor([tok("the red cat is in the city of paris 42")["input_ids"]])
    assert (_logits(model, ids) - _logits(back, ids)).abs().max() < 1e-4


def test_modelfile_has_template_and_stop_tokens(tiny_model_factory, lora_model_factory, tmp_path):
    model, tok = lora_model_factory(tiny_model_factory("qwen2"))
    model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=["q8_0", "f16"], verify=False)
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.Q8_0.gguf\n") and (tmp_path / "g" / "model.Q8_0.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "<|im_start|>{{ .Role }}" in text


def test_missing_llama_cpp_names_the_extra(tiny_model_factory, lora_model_factory, tmp_path, monkeypatch):
    import fastlm.utils.imports as imports
    from fastlm.errors import MissingDependencyError

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    real = imports.is_available
    monkeypatch.setattr(imports, "is_available", lambda m: False if m == "llama_cpp" else real(m))
    with pytest.raises(MissingDependencyError, match=r"fastlm\[gguf\]"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="q4_k_m", verify=False)
    with pytest.raises(MissingDependencyError, match="verify=False"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="q8_0")
    assert not (tmp_path / "g").exists()
    monkeypatch.setattr(imports, "is_available", lambda m: False if m == "gguf" else real(m))
    with pytest.raises(MissingDependencyError, match=r"fastlm\[gguf\]"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32", verify=False)


def test_bad_quantization_method(tiny_model_factory, lora_model_factory, tmp_path):
    from fastlm.errors import ConfigError

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    with pytest.raises(ConfigError, match="q9_z"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=["q8_0", "q9_z"])
