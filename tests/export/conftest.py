import pytest
import torch


def make_lora_model(model_dir, load_in_4bit=False, r=8, seed=0, **peft_kwargs):
    """fastlm model + LoRA whose B matrices are random (as after training), export methods attached."""
    from fastlm import FastLanguageModel
    from fastlm.export.methods import attach_export_methods

    model, tok = FastLanguageModel.from_pretrained(str(model_dir), load_in_4bit=load_in_4bit, max_seq_length=128)
    attach_export_methods(model)
    model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=2 * r, **peft_kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    attach_export_methods(model)
    return model, tok


@pytest.fixture
def lora_model_factory():
    return make_lora_model
