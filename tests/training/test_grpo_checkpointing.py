"""A real TRL GRPOTrainer run keeps fastlm's offloaded checkpointing ("unsloth") on through its generation steps.

TRL turns gradient checkpointing off for every generation (and for the no-grad log-prob pass) and on again with
`gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`; transformers' enable would put plain
`torch.utils.checkpoint` back on the layers for the rest of the run. Counted at the source: the offloaded path's
autograd Function and the plain checkpoint function transformers wraps.
"""
from __future__ import annotations

import pytest
import torch
import transformers.modeling_utils as hf_modeling
from datasets import Dataset

from fastlm import FastLanguageModel
from fastlm.patch.offload_checkpointing import is_offloaded_checkpointing
from fastlm.training.trl_compat import get_trainer_classes

PROMPTS = ["the cat is", "red", "one two three", "what is"]


def count_e(completions, **kwargs):
    return [float(c.count("e")) for c in completions]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_grpo_steps_keep_the_offloaded_checkpointing(tiny_model_factory, tmp_path, monkeypatch, checkpoint_calls):
    calls = checkpoint_calls  # offloaded / plain
    toggles = {"enable": 0, "disable": 0}
    set_checkpointing = hf_modeling.PreTrainedModel._set_gradient_checkpointing

    def counting_set(self, enable=True, **kwargs):  # every transformers enable / disable ends here
        toggles["enable" if enable else "disable"] += 1
        return set_checkpointing(self, enable, **kwargs)

    monkeypatch.setattr(hf_modeling.PreTrainedModel, "_set_gradient_checkpointing", counting_set)

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_factory("llama")), max_seq_length=64,
                                                   load_in_16bit=True)
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)  # use_gradient_checkpointing="unsloth"
    assert is_offloaded_checkpointing(model)
    classes = get_trainer_classes()
    args = classes.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                              num_generations=4, max_completion_length=4, learning_rate=1e-2, logging_steps=1,
                              save_strategy="no", report_to=[], bf16=False, seed=0, disable_tqdm=True,
                              dataloader_num_workers=0, dataloader_pin_memory=False)
    trainer = classes.GRPOTrainer(model=model, args=args, reward_funcs=count_e, processing_class=tok,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
    calls.update(offloaded=0, plain=0)
    toggles.update(enable=0, disable=0)
    trainer.train()

    assert trainer.state.global_step == 2
    assert toggles["disable"] >= 2 and toggles["enable"] >= 2  # TRL did toggle around its generation steps
    n_layers = model.config.num_hidden_layers
    assert calls["plain"] == 0 and calls["offloaded"] >= 2 * n_layers  # every training forward ran offloaded
    assert is_offloaded_checkpointing(model) and model.get_base_model().is_gradient_checkpointing
