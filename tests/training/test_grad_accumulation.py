"""Gradient accumulation gives the same step as the equivalent larger batch.

Four sequences of very different lengths (4 to ~45 tokens) are trained for one optimizer step on a fastlm LoRA model
through TRL's `SFTTrainer`, once as one batch of 4 and once as 4 micro-batches of 1. The first-step loss, the LoRA
gradients the optimizer sees, and the SGD update they make must agree to fp32 round-off. That holds only when
every micro-batch's summed token loss is divided by the number of label tokens in the whole accumulation window, as
transformers' `num_items_in_batch` does; the control test shows that averaging per micro-batch (the old
gradient-accumulation bug) would be caught on this data.

Everything runs in float32 (CPU, `bf16=False`). For QLoRA, TRL casts the adapters to bfloat16, whose rounding
(~0.4%) would hide the comparison, so that run keeps them in float32 with fastlm's `KeepAdapterDtypeCallback`.
"""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from fastlm import FastLanguageModel
from fastlm.training.trl_compat import KeepAdapterDtypeCallback, get_trainer_classes

PRECISIONS = {"lora16": {"load_in_16bit": True}, "qlora4": {"load_in_4bit": True}}
TEXTS = [
    "A dog.",
    "What is the capital of France? The capital of France is Paris. The capital of France is Paris.",
    "The cat.",
    "One two three red blue green dog bird tree river stone city and the capital of France.",
]
RTOL = 1e-5


class GradientGrab(TrainerCallback):
    """Copies the trainable gradients just before the optimizer step (after accumulation, before the update)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None}


def load_lora(model_dir, precision):
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=128, dtype=torch.float32,
                                                         **PRECISIONS[precision])
    # init_lora_weights=False: PEFT's random (non-zero) lora_B, so every LoRA matrix gets a non-zero gradient
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, init_lora_weights=False)
    return model, tokenizer


def make_trainer(model, tokenizer, tmp_path, batch_size, accumulation, callbacks=()):
    classes = get_trainer_classes()
    args = classes.SFTConfig(
        output_dir=str(tmp_path / f"b{batch_size}x{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, bf16=False, fp16=False, seed=0,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, max_length=128)
    return classes.SFTTrainer(model=model, args=args, processing_class=tokenizer, callbacks=list(callbacks),
                              train_dataset=Dataset.from_list([{"text": t} for t in TEXTS]))


def one_step(model_dir, tmp_path, precision, batch_size, accumulation):
    model, tokenizer = load_lora(model_dir, precision)
    grab = GradientGrab()
    trainer = make_trainer(model, tokenizer, tmp_path, batch_size, accumulation, [grab, KeepAdapterDtypeCallback()])
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    loss = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    updates = {n: p.detach().float() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    return loss, grab.grads, updates


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)).item() for k in a)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_accumulating_four_micro_batches_equals_one_batch_of_four(tiny_llama_dir, tmp_path, precision):
    loss_batch, grads_batch, update_batch = one_step(tiny_llama_dir, tmp_path, precision, 4, 1)
    loss_accum, grads_accum, update_accum = one_step(tiny_llama_dir, tmp_path, precision, 1, 4)

    assert len(grads_batch) == 2 * 7 * 2  # lora_A and lora_B on 7 projections in 2 layers, all with gradients
    assert all(g.norm() > 0 for g in grads_batch.values())
    assert loss_accum == pytest.approx(loss_batch, rel=RTOL)
    assert relative_error(grads_accum, grads_batch) < RTOL
    assert relative_error(update_accum, update_batch) < RTOL  # the SGD step itself, not just the weights after it


def test_per_micro_batch_mean_would_differ(tiny_llama_dir, tmp_path):
    """Control: on these lengths, averaging each micro-batch's mean loss (instead of normalising by the window's
    token count) changes the gradient far beyond the tolerance above, so the test above can catch that bug."""
    model, tokenizer = load_lora(tiny_llama_dir, "lora16")
    trainer = make_trainer(model, tokenizer, tmp_path, 1, 4)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items() if torch.is_tensor(v)} for b in trainer.get_train_dataloader()]
    lengths = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(batches) == 4 and max(lengths) >= 5 * min(lengths), lengths
    model.train()

    def gradients(token_normalised: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        for b in batches:
            if token_normalised:
                loss = model(**b, num_items_in_batch=sum(lengths)).loss
            else:
                loss = model(**b).loss / len(batches)
            loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    assert relative_error(gradients(False), gradients(True)) > 1000 * RTOL
