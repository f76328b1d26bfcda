"""Modes (for_training / for_inference) and get_peft_model arguments."""
import pytest
import torch
from transformers import TextStreamer

from fastlm import FastLanguageModel
from fastlm.errors import ConfigError
from fastlm.patch.checkpointing import is_checkpointing


@pytest.fixture
def lora_model(tiny_llama_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_llama_dir), max_seq_length=128, load_in_16bit=True)
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8), tok


def test_modes_switch_everything_a_user_relies_on(lora_model):
    model, tok = lora_model
    base = model.get_base_model()
    model.for_inference()  # also available as a method
    assert not model.training and base.config.use_cache and tok.padding_side == "left"
    assert not is_checkpointing(base)
    FastLanguageModel.for_training(model)
    assert model.training and not base.config.use_cache and tok.padding_side == "right"
    assert is_checkpointing(base)


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_generate_with_streamer_in_both_modes(lora_model, mode, capsys):
    model, tok = lora_model
    getattr(FastLanguageModel, f"for_{mode}")(model)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         streamer=TextStreamer(tok, skip_prompt=True))
    new_text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    assert new_text.strip() and new_text.strip() in capsys.readouterr().out


def test_batched_generation_left_pads_in_inference_mode(lora_model):
    model, tok = lora_model
    FastLanguageModel.for_inference(model)
    batch = tok(["the cat", "what is the capital of france"], return_tensors="pt", padding=True).to(model.device)
    assert batch["attention_mask"][0, 0] == 0  # padded on the left
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    single = model.generate(**tok(["the cat"], return_tensors="pt").to(model.device), max_new_tokens=4, min_new_tokens=4,
                            do_sample=False)
    assert out[0, -4:].tolist() == single[0, -4:].tolist()


def test_lora_argument_errors_all_reported(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True)
    with pytest.raises(ConfigError) as err:
        FastLanguageModel.get_peft_model(model, r=0, lora_dropout=1.5, bias="some",
                                         target_modules=["q_proj", "qq_proj"], use_gradient_checkpointing="x",
                                         layers_to_transform=[7], not_lora=1)
    msg = str(err.value)
    for needle in ("r=0", "lora_dropout=1.5", "bias='some'", "['qq_proj']", "down_proj, gate_proj",
                   "use_gradient_checkpointing='x'", "layers_to_transform=[7]", "not_lora"):
        assert needle in msg, f"{needle!r} missing from:\n{msg}"


def test_embed_and_lm_head_targets_are_trained_fully(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)


def test_seeded_lora_init_and_rslora_and_layers(tiny_llama_dir):
    def adapters(**kw):
        model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True)
        model = FastLanguageModel.get_peft_model(model, r=4, **kw)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}, model

    a, _ = adapters(random_state=1)
    b, _ = adapters(random_state=1)
    c, _ = adapters(random_state=2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    d, model = adapters(layers_to_transform=[1], use_rslora=True)
    assert all(".layers.1." in n for n in d)
    assert model.peft_config["default"].use_rslora


def test_full_finetuning_makes_get_peft_model_a_noop(tiny_llama_dir, caplog):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), full_finetuning=True)
    with caplog.at_level("WARNING"):
        same = FastLanguageModel.get_peft_model(model)
    assert same is model and "full_finetuning=True" in caplog.text


def test_float32_mixed_precision_controls_adapter_dtype(tiny_llama_dir):
    for flag, expected in ((None, torch.float32), (False, torch.bfloat16)):
        model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, dtype=torch.bfloat16,
                                                     float32_mixed_precision=flag)
        model = FastLanguageModel.get_peft_model(model, r=4)
        dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert dtypes == {expected}
