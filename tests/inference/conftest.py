import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.inference.attach import attach_inference_methods, enable_fast_generate


def load(path, lora=False, **overrides):
    """A tiny fastlm model in inference mode with the engine installed (what for_inference will do once wired).
    `lora`: attach a LoRA adapter with random, non-zero B so that it changes the output."""
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=256, load_in_16bit=True, **overrides)
    if lora:
        torch.manual_seed(1)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    FastLanguageModel.for_inference(model)
    attach_inference_methods(model)
    enable_fast_generate(model)
    return model, tok


@pytest.fixture
def loaded():
    return load
