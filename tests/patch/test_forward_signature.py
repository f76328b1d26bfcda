"""The patched `*ForCausalLM.forward` shows the class's signature: transformers' Trainer keeps only the dataset
columns `inspect.signature(model.forward)` names, so a `(*args, **kwargs)` forward made it drop `input_ids`."""
import inspect

import pytest
import torch
from transformers import Trainer, TrainingArguments

from fastlm import FastLanguageModel, patch

datasets = pytest.importorskip("datasets")


def test_plain_trainer_keeps_the_model_inputs_of_a_patched_model(tiny_llama_dir, tmp_path):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, dtype=torch.float32,
                                                 max_seq_length=64, use_gradient_checkpointing=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    base = model.get_base_model()
    assert "fused_loss" in patch.patch_set(model) and "forward" in base.__dict__
    assert inspect.signature(base.forward) == inspect.signature(type(base).forward.__get__(base))

    rows = [[5, 6, 7, 8, 9, 10]] * 2
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows, "text": ["unused"] * 2})
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = Trainer(model=model, args=args, train_dataset=data).train()  # remove_unused_columns=True (default)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
