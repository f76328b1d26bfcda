"""Training-time generate (fastlm/inference/train_generate.py): a `generate` call made while the model trains (TRL's
GRPO step) runs on the engine with the weights of the latest optimizer step, and leaves the model as it found it.

The reference is transformers' own generate on the same, updated model in eval mode (the hook passes eval-mode
calls through untouched). Engine use is counted by wrapping `Engine.prefill` / `Engine.__init__`, not read from the
hook's own state.
"""
from __future__ import annotations

import logging

import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.inference import engine as engine_module
from fastlm.inference.train_generate import (install_training_generate, remove_training_generate,
                                             training_generate_installed)

PROMPTS = ["the cat is", "what is the capital of france? the capital", "red"]


@pytest.fixture
def engine_calls(monkeypatch):
    """Counts engine constructions and prefills (each generate served by the engine prefills its prompts)."""
    calls = {"init": 0, "prefill": 0}
    init, prefill = engine_module.Engine.__init__, engine_module.Engine.prefill

    def counting_init(self, *a, **k):
        calls["init"] += 1
        init(self, *a, **k)

    def counting_prefill(self, *a, **k):
        calls["prefill"] += 1
        return prefill(self, *a, **k)

    monkeypatch.setattr(engine_module.Engine, "__init__", counting_init)
    monkeypatch.setattr(engine_module.Engine, "prefill", counting_prefill)
    return calls


def load(path, full=False, lora_dropout=0.0):
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=128, load_in_16bit=True,
                                                   full_finetuning=full)
    if not full:
        torch.manual_seed(1)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                                 lora_dropout=lora_dropout)
    tok.padding_side = "left"
    model.train()
    return model, tok


def hf_generate(model, batch, **kw):
    """transformers' generate on the model as it is now (eval mode: the hook passes the call through)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return model.generate(**batch, **kw)
    finally:
        for m, t in flags:
            m.training = t


def sgd_step(model, tok, lr):
    """One optimizer step on a language-modelling loss over the prompts (weights change in place, as in training)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    batch = tok(["the dog runs fast", "blue green red"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("full,fuse", [(False, None), (False, True), (True, None), (True, True)],
                         ids=["lora", "lora-fused", "full", "full-fused"])
def test_greedy_after_an_optimizer_step_equals_transformers(tiny_model_factory, engine_calls, full, fuse):
    """The engine must see each step's weights: LoRA through refreshed adapter copies (fused), full fine-tuning
    through the live modules or a rebuild (fused). A stale engine keeps producing the pre-step tokens."""
    model, tok = load(tiny_model_factory("llama"), full=full)
    install_training_generate(model, fuse=fuse)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False)
    before = model.generate(**batch, **kw)
    assert engine_calls["prefill"] >= 1  # served by the engine
    assert before.tolist() == hf_generate(model, batch, **kw).tolist()

    sgd_step(model, tok, lr=3.0 if full else 30.0)
    prefills = engine_calls["prefill"]
    after = model.generate(**batch, **kw)
    assert engine_calls["prefill"] > prefills
    reference = hf_generate(model, batch, **kw)
    assert after.tolist() != before.tolist(), "the step did not change the greedy output: the test cannot tell"
    assert after.tolist() == reference.tolist()
    # LoRA refreshes its copies in place; fused full fine-tuning rebuilds (the only exact way with copies)
    assert engine_calls["init"] == (2 if (full and fuse) else 1)


def test_model_state_is_restored_and_dropout_is_off(tiny_model_factory, engine_calls):
    model, tok = load(tiny_model_factory("llama"), lora_dropout=0.5)
    from fastlm.state import base_model_of

    base = base_model_of(model)
    base.model.layers[0].mlp.eval()  # a module the user keeps in eval mode stays so
    flags = {n: m.training for n, m in model.named_modules()}
    use_cache = base.config.use_cache
    checkpointing = base.is_gradient_checkpointing
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False)
    first = model.generate(**batch, **kw)
    second = model.generate(**batch, **kw)
    assert engine_calls["prefill"] >= 2
    # dropout 0.5 on the adapters would change greedy tokens between calls; the engine generates without it
    assert first.tolist() == second.tolist() == hf_generate(model, batch, **kw).tolist()
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert base.config.use_cache == use_cache and base.is_gradient_checkpointing == checkpointing


def test_calls_the_engine_does_not_serve_go_to_transformers(tiny_model_factory, engine_calls, caplog, monkeypatch):
    from fastlm.inference import generate as generate_module

    monkeypatch.setattr(generate_module, "_noticed", set())  # each reason is told once per process
    model, tok = load(tiny_model_factory("llama"))
    batch = tok(PROMPTS[:1], return_tensors="pt")
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        beams = model.generate(**batch, max_new_tokens=6, do_sample=False, num_beams=2)
    assert engine_calls["prefill"] == 0
    assert "num_beams=2 is not served by the engine" in caplog.text
    assert beams.tolist() == hf_generate(model, batch, max_new_tokens=6, do_sample=False, num_beams=2).tolist()
    assert model.training  # transformers ran in the caller's mode


def test_eval_mode_calls_pass_through_and_remove_restores(tiny_model_factory, engine_calls):
    model, tok = load(tiny_model_factory("llama"))
    batch = tok(PROMPTS[:1], return_tensors="pt")
    hf_generate(model, batch, max_new_tokens=4, do_sample=False)
    assert engine_calls["prefill"] == 0  # eval mode: transformers' generate (for_inference installs the engine)
    assert training_generate_installed(model)  # fastlm models get the hook when loaded
    remove_training_generate(model)
    assert not training_generate_installed(model)
    assert "generate" not in model.__dict__ and "generate" not in model.get_base_model().__dict__
    model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert engine_calls["prefill"] == 0


def test_for_inference_and_for_training_keep_the_hook_working(tiny_model_factory, engine_calls):
    model, tok = load(tiny_model_factory("llama"))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False)
    FastLanguageModel.for_inference(model)
    served = model.generate(**batch, **kw)  # the inference engine
    FastLanguageModel.for_training(model)
    prefills = engine_calls["prefill"]
    assert model.generate(**batch, **kw).tolist() == served.tolist()  # train mode: the training-time hook
    assert engine_calls["prefill"] > prefills
    assert training_generate_installed(model)


def test_sharded_weights_go_to_transformers(tiny_model_factory, engine_calls, caplog, monkeypatch):
    """DeepSpeed ZeRO-3 marks its partitioned parameters with ds_id; the engine cannot keep references to them."""
    from fastlm.inference import generate as generate_module

    monkeypatch.setattr(generate_module, "_noticed", set())
    model, tok = load(tiny_model_factory("llama"))
    next(model.parameters()).ds_id = 0
    batch = tok(PROMPTS[:1], return_tensors="pt")
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert engine_calls["init"] == 0 and "sharded by DeepSpeed ZeRO-3" in caplog.text
    assert out.tolist() == hf_generate(model, batch, max_new_tokens=4, do_sample=False).tolist()


def test_train_mode_after_for_inference_uses_the_training_engine(tiny_model_factory, engine_calls, monkeypatch):
    """for_inference's engine is cached across calls; once a trainer puts the model back in train mode its calls
    must go to the training-time engine, which follows the weight updates."""
    from fastlm.inference.train_generate import TrainingEngine

    served = []
    call = TrainingEngine.__call__
    monkeypatch.setattr(TrainingEngine, "__call__", lambda self, *a, **k: served.append(1) or call(self, *a, **k))
    model, tok = load(tiny_model_factory("llama"), full=True)
    FastLanguageModel.for_inference(model)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False)
    model.generate(**batch, **kw)
    assert served == []  # eval mode: the inference engine
    model.train()  # what a trainer does
    sgd_step(model, tok, lr=3.0)
    ours = model.generate(**batch, **kw)
    assert served == [1]
    from fastlm.inference.attach import disable_fast_generate

    disable_fast_generate(model)  # the reference is transformers' own generate
    assert ours.tolist() == hf_generate(model, batch, **kw).tolist()

