"""TRL's GRPOTrainer generates on the fastlm engine when it trains a fastlm model (LoRA and full fine-tuning), and
what TRL builds from those completions (ids, EOS cut, masks, padding) is exactly what its own path builds.

Engine use is counted by wrapping `Engine.prefill` (every engine-served generate prefills its prompts). TRL's
per-batch tensors are read from `_generate_and_score_completions`, the step that turns generations into the
training batch.
"""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from fastlm import FastLanguageModel
from fastlm.inference import engine as engine_module
from fastlm.inference.train_generate import remove_training_generate, training_generate_installed
from fastlm.training.trl_compat import EngineGenerationCallback, get_trainer_classes

PROMPTS = ["the cat is", "what is the capital of france?", "red", "one two three"]
COMMON = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, gradient_accumulation_steps=1,
              logging_steps=1, save_strategy="no", report_to=[], bf16=False, seed=0, disable_tqdm=True,
              dataloader_num_workers=0, dataloader_pin_memory=False)


def count_e(completions, **kwargs):
    return [float(c.count("e")) for c in completions]


@pytest.fixture
def prefills(monkeypatch):
    calls = []
    prefill = engine_module.Engine.prefill

    def counting(self, slots, prompts):
        calls.append(len(prompts))
        return prefill(self, slots, prompts)

    monkeypatch.setattr(engine_module.Engine, "prefill", counting)
    return calls


def load(path, full: bool, load_in_4bit: bool = False):
    bits = {"load_in_4bit": True} if load_in_4bit else {"load_in_16bit": True}
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=64, full_finetuning=full, **bits)
    if not full:
        torch.manual_seed(0)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    return model, tok


def frequent_token(model, tok) -> int:
    """A token the model's greedy continuation of the first prompt produces: made an EOS id, rows really end."""
    batch = tok(PROMPTS[:1], return_tensors="pt")
    model.eval()
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    model.train()
    return int(out[0, batch["input_ids"].shape[1] + 2])


def run_grpo(model, tok, tmp_path, steps, callbacks=(), **overrides):
    """Train `steps` GRPO steps; returns (trainer, the batches TRL built from each generation)."""
    classes = get_trainer_classes()
    args = classes.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=steps, **{**COMMON, **overrides})
    trainer = classes.GRPOTrainer(model=model, args=args, reward_funcs=count_e, processing_class=tok,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                                  callbacks=list(callbacks))
    batches = []
    build = trainer._generate_and_score_completions

    def capture(inputs):
        out = build(inputs)
        batches.append({k: v.detach().cpu().clone() for k, v in out.items() if isinstance(v, torch.Tensor)})
        return out

    trainer._generate_and_score_completions = capture
    trainer.train()
    return trainer, batches


def assert_masks_follow_first_eos(batch, eos_ids, pad_id):
    """TRL's rule: a completion ends at its first EOS (kept), everything after is padding, masked out."""
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    ended = 0
    for row, m in zip(ids.tolist(), mask.tolist()):
        hits = [i for i, t in enumerate(row) if t in eos_ids and m[i]]
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        if hits:
            assert hits[0] == n - 1  # the first EOS is the last kept token
            ended += 1
        assert all(t == pad_id for t in row[n:])
    return ended


@pytest.mark.parametrize("full,nf4", [(False, False), (True, False), (False, True)], ids=["lora", "full", "qlora4"])
def test_engine_batch_equals_trl_own_generation(tiny_model_factory, tmp_path, prefills, full, nf4):
    """Greedy (top_k=1) GRPO step: TRL's prompt/completion ids and masks are the same tensors with the engine as
    with transformers' generate (TRL's own path), including rows cut at an EOS and right padding."""
    path = tiny_model_factory("llama")
    results = []
    for use_engine in (True, False):
        model, tok = load(path, full, load_in_4bit=nf4)
        eos = frequent_token(model, tok)
        model.generation_config.eos_token_id = [tok.eos_token_id, eos]
        if not use_engine:
            remove_training_generate(model)
        before = len(prefills)
        trainer, batches = run_grpo(model, tok, tmp_path, steps=1, top_k=1, learning_rate=1e-3,
                                    per_device_train_batch_size=8, num_generations=2)  # 4 prompts, 2 each
        assert (len(prefills) > before) == use_engine
        results.append((batches, trainer))
    (engine_batches, trainer), (trl_batches, _) = results
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    for ours, theirs in zip(engine_batches, trl_batches, strict=True):
        for key in keys:
            assert ours[key].tolist() == theirs[key].tolist(), key
    ended = assert_masks_follow_first_eos(engine_batches[0], trainer.eos_token_ids, tok.pad_token_id)
    assert 0 < ended < len(engine_batches[0]["completion_ids"])  # some rows stop at the EOS, some run full length


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_grpo_trains_with_engine_generation(tiny_model_factory, tmp_path, prefills, full):
    model, tok = load(tiny_model_factory("llama"), full)
    model.generation_config.eos_token_id = [tok.eos_token_id, frequent_token(model, tok)]
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = (base.is_gradient_checkpointing, base.config.use_cache)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = 3
    trainer, batches = run_grpo(model, tok, tmp_path, steps=steps, learning_rate=5e-2 if full else 5e-2,
                                temperature=0.7)
    assert len(prefills) >= steps and sum(prefills) >= steps * len(PROMPTS)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(trained[n], p) for n, p in model.named_parameters() if n in trained)
    for batch in batches:
        assert_masks_follow_first_eos(batch, trainer.eos_token_ids, tok.pad_token_id)
    assert model.training and (base.is_gradient_checkpointing, base.config.use_cache) == state


def test_callback_scopes_the_engine_to_one_run_on_a_plain_transformers_model(tiny_model_factory, tmp_path,
                                                                           prefills):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory("llama")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(path)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert not training_generate_installed(model)
    run_grpo(model, tok, tmp_path, steps=2, learning_rate=1e-2, callbacks=[EngineGenerationCallback()])
    assert len(prefills) >= 2
    assert not training_generate_installed(model)  # removed at the end of training
    assert "generate" not in model.__dict__ and "generate" not in model.get_base_model().__dict__


def test_callback_says_when_trl_generates_elsewhere(tiny_model_factory, caplog):
    model, _ = load(tiny_model_factory("llama"), full=False)
    remove_training_generate(model)
    callback = EngineGenerationCallback()
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        callback.on_train_begin(SimpleNamespace(use_vllm=True), None, None, model=model)
    assert "use_vllm=True: TRL generates with its own backend" in caplog.text
    assert not training_generate_installed(model)
    with pytest.raises(ValueError, match="fuse='yes'"):
        EngineGenerationCallback(fuse="yes")
