"""TRL trainers run unchanged on fastlm models: SFT, DPO, ORPO, KTO and GRPO, each with LoRA on a 16-bit model and
with QLoRA (bitsandbytes NF4), a few steps on a tiny random llama on CPU.

Each test checks what a user would notice: the loss is finite and moves, and the LoRA weights were trained (the
saved adapter would differ from the initial one). The trainers are TRL's own classes, imported through
`fastlm.training.trl_compat` so that the moved ones (ORPO lives in `trl.experimental.orpo` in TRL 1.x) resolve.
"""
from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from fastlm import FastLanguageModel
from fastlm.training.trl_compat import KeepAdapterDtypeCallback, get_trainer_classes

PRECISIONS = {"lora16": {"load_in_16bit": True}, "qlora4": {"load_in_4bit": True}}

PROMPTS = ["What is the capital of France?", "Name a red thing.", "One two three?", "Is the cat blue?"]
GOOD = ["The capital of France is Paris.", "A red stone.", "Four.", "No, the cat is green."]
BAD = ["Blue river tree.", "Dog city the.", "The a of in.", "Fast small large."]

# Settings shared by every trainer: a few steps without autocast (TRL's configs default to bf16 autocast, slow on
# CPU), no checkpoints, no reporting.
COMMON = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=4, learning_rate=5e-3,
              logging_steps=1, save_strategy="no", report_to=[], bf16=False, seed=0,
              disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)


def load_lora(tiny_llama_dir, precision: str):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), max_seq_length=64,
                                                         **PRECISIONS[precision])
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    return model, tokenizer


def lora_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_trained(model, before: dict[str, torch.Tensor], trainer, loss_key: str = "loss", loss_moves: bool = True):
    after = lora_snapshot(model)
    assert after.keys() == before.keys() and before
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "no LoRA weight changed during training"
    assert all(torch.isfinite(t).all() for t in after.values())
    losses = [row[loss_key] for row in trainer.state.log_history if loss_key in row and "train_runtime" not in row]
    assert len(losses) == trainer.args.max_steps, trainer.state.log_history
    assert all(math.isfinite(x) for x in losses), losses
    if loss_moves:
        assert max(losses) - min(losses) > 1e-4, f"loss did not move: {losses}"
    return losses


def config(cls, tmp_path, **overrides):
    return cls(output_dir=str(tmp_path / "out"), **{**COMMON, **overrides})


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_sft_trainer(tiny_llama_dir, tmp_path, precision):
    classes = get_trainer_classes()
    model, tokenizer = load_lora(tiny_llama_dir, precision)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": g}]}
            for p, g in zip(PROMPTS, GOOD)]
    args = config(classes.SFTConfig, tmp_path, max_length=64, learning_rate=1e-2)
    trainer = classes.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
    before = lora_snapshot(model)
    trainer.train()
    losses = assert_trained(model, before, trainer)
    assert losses[-1] < losses[0], losses  # memorising four short answers: the loss falls


def preference_rows():
    return [{"prompt": p, "chosen": " " + g, "rejected": " " + b} for p, g, b in zip(PROMPTS, GOOD, BAD)]


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_dpo_trainer(tiny_llama_dir, tmp_path, precision):
    classes = get_trainer_classes()
    model, tokenizer = load_lora(tiny_llama_dir, precision)
    args = config(classes.DPOConfig, tmp_path, max_length=64, beta=0.1)
    trainer = classes.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(preference_rows()),
                                 processing_class=tokenizer)
    before = lora_snapshot(model)
    trainer.train()
    losses = assert_trained(model, before, trainer)
    # the reference is the same model with its adapter disabled, so the first step starts at log(2); then the
    # policy learns to prefer the chosen answers
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_orpo_trainer(tiny_llama_dir, tmp_path, precision):
    classes = get_trainer_classes()
    model, tokenizer = load_lora(tiny_llama_dir, precision)
    args = config(classes.ORPOConfig, tmp_path, max_length=64, max_completion_length=32, beta=0.1)
    trainer = classes.ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(preference_rows()),
                                  processing_class=tokenizer)
    before = lora_snapshot(model)
    trainer.train()
    losses = assert_trained(model, before, trainer)
    assert losses[-1] < losses[0], losses  # NLL on the chosen answers plus the odds-ratio term, both learnable


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_kto_trainer(tiny_llama_dir, tmp_path, precision):
    classes = get_trainer_classes()
    model, tokenizer = load_lora(tiny_llama_dir, precision)
    rows = [{"prompt": p, "completion": " " + g, "label": True} for p, g in zip(PROMPTS, GOOD)]
    rows += [{"prompt": p, "completion": " " + b, "label": False} for p, b in zip(PROMPTS, BAD)]
    args = config(classes.KTOConfig, tmp_path, max_length=64, per_device_train_batch_size=4)
    trainer = classes.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
    before = lora_snapshot(model)
    trainer.train()
    assert_trained(model, before, trainer)


def count_e(completions, **kwargs) -> list[float]:
    """A plain reward function: how many letters 'e' a completion holds."""
    return [float(c.count("e")) for c in completions]


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_grpo_trainer(tiny_llama_dir, tmp_path, precision):
    classes = get_trainer_classes()
    model, tokenizer = load_lora(tiny_llama_dir, precision)
    args = config(classes.GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, learning_rate=2e-2)
    trainer = classes.GRPOTrainer(model=model, args=args, reward_funcs=count_e,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                                  processing_class=tokenizer)
    before = lora_snapshot(model)
    trainer.train()
    assert_trained(model, before, trainer, loss_moves=False)  # GRPO's loss is ~0 by construction (mean advantage 0)
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    assert rewards and all(math.isfinite(r) for r in rewards)


def test_keep_adapter_dtype_callback_keeps_qlora_adapters_in_float32(tiny_llama_dir, tmp_path):
    """TRL casts a quantized model's trainable weights to bf16; fastlm's callback restores its float32 adapters
    before the optimizer is built, and training goes on as usual."""
    classes = get_trainer_classes()
    model, tokenizer = load_lora(tiny_llama_dir, "qlora4")
    data = Dataset.from_list([{"prompt": p, "completion": " " + g} for p, g in zip(PROMPTS, GOOD)])
    args = config(classes.SFTConfig, tmp_path, max_length=64, max_steps=2)
    plain = classes.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trl_dtypes = {p.dtype for n, p in plain.model.named_parameters() if "lora_" in n}

    model, tokenizer = load_lora(tiny_llama_dir, "qlora4")
    trainer = classes.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 callbacks=[KeepAdapterDtypeCallback()])
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}, trl_dtypes
    before = lora_snapshot(model)
    trainer.train()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert_trained(model, before, trainer)


def test_trainer_classes_resolve_where_trl_keeps_them():
    import importlib

    import trl

    from fastlm.training import trl_compat

    classes = get_trainer_classes()
    assert classes.SFTTrainer is trl.SFTTrainer and classes.GRPOTrainer is trl.GRPOTrainer
    # TRL 1.16: KTO is stable (trl.experimental.kto is a deprecated alias), ORPO only in trl.experimental.orpo
    kto = getattr(trl, "KTOTrainer", None) or importlib.import_module("trl.experimental.kto").KTOTrainer
    orpo = importlib.import_module("trl.experimental.orpo").ORPOTrainer
    assert classes.KTOTrainer is kto
    assert trl_compat.ORPOTrainer is orpo  # lazy module attribute
    with pytest.raises(AttributeError):
        trl_compat.NoSuchTrainer
