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


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_gguf_in_llama_cpp_matches_hf(model_type, tiny_model_factory, lora_model_factory, tmp_path):
    pytest.importorskip("llama_cpp")
    model, tok = lora_model_factory(tiny_model_factory(model_type, **TIED.get(model_type, {})))
    report = model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=["f32", "q8_0"])
    f32, q8 = report["checks"]
    assert f32["passed"] and q8["passed"]
    assert f32["metrics"]["max_abs_logit_diff"] < 1e-3  # llama.cpp's logits vs the adapter model's
    assert f32["metrics"]["greedy_agreement_tokens"] == f32["metrics"]["greedy_tokens"]
    assert 0 <= q8["metrics"]["mean_kl"] < 0.01
    saved = json.loads((tmp_path / "g" / "fastlm_export_report.json").read_text())
    assert [c["name"] for c in saved["checks"]] == ["gguf f32", "gguf q8_0"]


def test_k_quant_through_llama_cpp(tiny_model_factory, lora_model_factory, tmp_path):
    """q4_k_m needs rows that are multiples of 256: a tiny llama of hidden size 256."""
    pytest.importorskip("llama_cpp")
    model, tok = lora_model_factory(tiny_model_factory("llama", hidden_size=256, intermediate_size=512,
                                                       num_attention_heads=4, num_key_value_heads=2))
    report = model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=["q4_k_m", "q8_0"])
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert names == ["Modelfile", "fastlm_export_report.json", "model.Q4_K_M.gguf", "model.Q8_0.gguf"]
    k = report["checks"][0]
    assert k["tier"] == "report" and k["passed"]
    assert 0 < k["metrics"]["mean_kl"] < 0.5 and len(k["llama_cpp_greedy"]) > 0
    assert (tmp_path / "g" / "model.Q4_K_M.gguf").stat().st_size < (tmp_path / "g" / "model.Q8_0.gguf").stat().st_size


def test_failed_check_keeps_files_and_says_what_differed(tiny_model_factory, lora_model_factory, tmp_path,
                                                         monkeypatch):
    pytest.importorskip("llama_cpp")
    import fastlm.export.gguf.convert as convert
    from fastlm.export.verify import ExportVerificationError

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    monkeypatch.setitem(convert.FAMILIES, "llama", convert.GGUFFamily("LLAMA", permute_qk=False))  # a broken converter
    with pytest.raises(ExportVerificationError, match="gguf f32.*max .logit difference"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32")
    assert (tmp_path / "g" / "model.F32.gguf").is_file()
    assert not json.loads((tmp_path / "g" / "fastlm_export_report.json").read_text())["checks"][0]["passed"]
