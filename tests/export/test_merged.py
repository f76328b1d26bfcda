"""merged_16bit / merged_4bit / lora exports: reloaded with plain transformers / PEFT they compute what the adapter
model computes; a 4-bit model merges into its original 16-bit weights."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures.tiny import FAMILY_MODEL_TYPES


def _reload_logits(directory, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return m(input_ids=ids).logits


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_merged_16bit_matches_adapter_model(model_type, tiny_model_factory, lora_model_factory, tmp_path):
    model, tok = lora_model_factory(tiny_model_factory(model_type))
    out = tmp_path / "merged"
    report = model.save_pretrained_merged(out, tok, save_method="merged_16bit")
    assert report["checks"][0]["passed"]
    ids = torch.tensor([tok("the cat is in the city of paris")["input_ids"]])
    ref = _logits(model, ids)
    got = _reload_logits(out, ids)
    assert (ref - got).abs().max() < 1e-4
    # the adapter changed the model: the merge really carries the LoRA delta
    with model.disable_adapter():
        assert (_logits(model, ids) - ref).abs().max() > 1e-2
    assert json.loads((out / "fastlm_export_report.json").read_text())["checks"][0]["passed"]
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_generation_config_stops_at_end_of_turn(tiny_model_factory, lora_model_factory, tmp_path):
    model, tok = lora_model_factory(tiny_model_factory("llama"))
    model.save_pretrained_merged(tmp_path / "m", tok, verify=False)
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_lora_and_merged_4bit_reload(model_type, tiny_model_factory, lora_model_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = lora_model_factory(tiny_model_factory(model_type))
    ids = torch.tensor([tok("what is the capital of france")["input_ids"]])
    ref = _logits(model, ids)

    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora" / "model.safetensors").exists()

    report = model.save_pretrained_merged(tmp_path / "q4", tok, save_method="merged_4bit")
    assert report["checks"][0]["passed"]
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path / "q4")
    assert q4.is_loaded_in_4bit
    with torch.no_grad():
        got = q4(input_ids=ids).logits.float()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean() < 0.05


def test_4bit_model_merges_into_original_16bit_weights(tiny_model_factory, lora_model_factory, tmp_path):
    src = tiny_model_factory("llama")
    model, tok = lora_model_factory(src, load_in_4bit=True)
    assert model.get_base_model().is_loaded_in_4bit
    report = model.save_pretrained_merged(tmp_path / "m", tok, save_method="merged_16bit")
    assert report["checks"][0]["passed"]
    merged = load_file(tmp_path / "m" / "model.safetensors")
    original = load_file(src / "model.safetensors")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = original["model.layers.0.self_attn.q_proj.weight"] + (16 / 8) * b @ a
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert torch.equal(merged["model.norm.weight"], original["model.norm.weight"])


def test_lora_export_of_a_4bit_model_reloads_with_its_config_as_an_object(tiny_model_factory, lora_model_factory,
                                                                          tmp_path):
    """A 4-bit model loaded on CUDA carries config.quantization_config as a BitsAndBytesConfig object (on the H100
    with transformers 5.17); the lora export's reload check passed that config to from_pretrained, which read it with
    .get and failed. The check must reload it either way."""
    from transformers import BitsAndBytesConfig

    model, tok = lora_model_factory(tiny_model_factory("llama"), load_in_4bit=True)
    base = model.get_base_model()
    qc = base.config.quantization_config
    base.config.quantization_config = qc if isinstance(qc, BitsAndBytesConfig) else BitsAndBytesConfig.from_dict(
        dict(qc))
    report = model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    assert report["checks"][0]["passed"], report["checks"][0]
    assert isinstance(base.config.quantization_config, BitsAndBytesConfig)  # the model's own config is untouched
