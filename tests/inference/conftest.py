import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (the NF4 decode GEMV) run on CPU under the interpreter only
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
