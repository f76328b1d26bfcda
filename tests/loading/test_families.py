"""Every registered architecture: tiny random model -> from_pretrained (16/4/8-bit) -> LoRA -> training lowers the
loss -> generate."""
import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.arch import lookup, registered_families
from fixtures.tiny import FAMILY_MODEL_TYPES

PRECISIONS = {"16bit": dict(load_in_16bit=True), "4bit": dict(load_in_4bit=True), "8bit": dict(load_in_8bit=True)}


def test_fixture_covers_every_registered_family():
    covered = {lookup(t).family for t in FAMILY_MODEL_TYPES}
    assert covered == {s.family for s in registered_families()}


def _linear_class(model):
    base = model.get_base_model()
    spec = lookup(base.config.model_type)
    attn = getattr(base.model.layers[0], spec.attention_path)
    return type(getattr(attn, "o_proj").base_layer).__name__


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_load_lora_train_generate(tiny_model_factory, model_type, precision):
    path = tiny_model_factory(model_type)
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=128, **PRECISIONS[precision])
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    assert _linear_class(model) == {"16bit": "Linear", "4bit": "Linear4bit", "8bit": "Linear8bitLt"}[precision]
    assert model.num_parameters(only_trainable=True) > 0

    FastLanguageModel.for_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    batch = tok(["the cat is red and the dog is blue", "what is the capital of france"], return_tensors="pt",
                padding=True).to(model.device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = []
    for _ in range(6):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    FastLanguageModel.for_inference(model)
    prompt = tok(["the cat"], return_tensors="pt").to(model.device)
    out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)
