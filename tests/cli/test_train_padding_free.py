"""`fastlm train` uses padding-free SFT batches by default where the model keeps packed sequences apart: the model
sees one row per step (the step's sequences concatenated, position_ids restarting at 0, no pad token, no attention
mask), each sequence cut to model.max_seq_length exactly as TRL cuts padded rows, and the per-step losses are those
of the padded run. ``training.extra.padding_free: false`` gives padded batches back; asking for padding-free on a
model fastlm has not checked is a ConfigError naming the fix."""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from fastlm.errors import ConfigError
from fastlm.jobs.train import train_from_config
from fixtures.tiny import build_tokenizer

from _cli_helpers import write_config

MAX_LEN = 40
BATCH = 3
STEPS = 4


class RecordInputs(TrainerCallback):
    """Records the tensors every training forward of the model receives."""

    def __init__(self):
        self.batches: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, args, kwargs):
            if module.training:
                self.batches.append({k: v.detach().cpu().clone() for k, v in kwargs.items()
                                     if isinstance(v, torch.Tensor)})

        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


@pytest.fixture(scope="module")
def varied_text(tmp_path_factory):
    """Rows of 2..40 words: with the tiny tokenizer many pad a lot in a batch, and the longest exceed MAX_LEN."""
    rng = random.Random(0)
    words = "the a cat dog bird tree river stone city capital paris what is of in and to answer".split()
    path = tmp_path_factory.mktemp("data") / "varied.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))})
                            + "\n" for _ in range(24)))
    return path


def _run(tmp_path, model_dir, data, name, caplog, **extra):
    recorder = RecordInputs()
    cfg = write_config(tmp_path / f"{name}.yaml", model_dir, tmp_path / name, data=data,
                       model={"dtype": "float32", "max_seq_length": MAX_LEN, "use_gradient_checkpointing": False},
                       training={"max_steps": STEPS, "per_device_train_batch_size": BATCH, "save_steps": 100,
                                 "extra": extra},
                       output={"loss_plot": False, "save_model": False})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastlm"):
        result = train_from_config(cfg, callbacks=[recorder], verbose=False)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    notices = [r.getMessage() for r in caplog.records if "padding-free" in r.getMessage()]
    return recorder.batches, losses, notices


def _segments(batch):
    """The sequences of a padding-free row, split where position_ids restart; checks positions count up by one."""
    pos, ids = batch["position_ids"][0], batch["input_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    out = []
    for a, b in zip(starts, starts[1:]):
        assert torch.equal(pos[a:b], torch.arange(b - a)), pos
        out.append(ids[a:b])
    return out


# gemma2: sliding-window and soft-capped attention, which fastlm's packed path leaves to transformers' masks
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_padding_free_by_default_same_losses_as_padded_and_off_switch(tmp_path, tiny_model_factory, model_type,
                                                                      varied_text, caplog):
    model_dir = tiny_model_factory(model_type)
    packed, packed_losses, on_notices = _run(tmp_path, model_dir, varied_text, "default", caplog)
    padded, padded_losses, off_notices = _run(tmp_path, model_dir, varied_text, "off", caplog, padding_free=False)
    assert len(on_notices) == 1 and "padding-free batches on" in on_notices[0], on_notices
    assert off_notices == []
    assert len(packed) == len(padded) == STEPS

    # the off switch: padded rows with an attention mask, and padding really present
    assert all(b["input_ids"].shape[0] == BATCH and "attention_mask" in b for b in padded)
    assert sum(int((b["attention_mask"] == 0).sum()) for b in padded) > 20

    # by default: one row of the same sequences, no pad tokens, no mask, each cut to max_seq_length
    truncated = saved = 0
    for p, q in zip(packed, padded):
        assert p["input_ids"].shape[0] == 1 and "attention_mask" not in p
        rows = [q["input_ids"][i][q["attention_mask"][i] == 1] for i in range(BATCH)]
        segments = _segments(p)
        assert len(segments) == BATCH
        for seg, row in zip(segments, rows):
            assert torch.equal(seg, row)
        assert p["input_ids"].shape[1] == sum(len(r) for r in rows)
        saved += q["input_ids"].numel() - p["input_ids"].shape[1]
        truncated += sum(len(s) == MAX_LEN for s in segments)
    assert saved > 20  # the padded run computed that many pad tokens
    assert truncated, "no sequence reached max_seq_length: the truncation is not exercised"

    assert len(packed_losses) == len(padded_losses) == STEPS
    for step, (a, b) in enumerate(zip(packed_losses, padded_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), (step, packed_losses, padded_losses)
    assert packed_losses[-1] < packed_losses[0]  # it trains


@pytest.fixture(scope="module")
def unchecked_family_dir(tmp_path_factory):
    """A tiny model of a family fastlm registers no spec for (so its packed attention is not vouched for)."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model("olmo", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-olmo")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_unchecked_family_stays_padded_and_explicit_on_is_an_error(tmp_path, unchecked_family_dir, varied_text,
                                                                   caplog):
    batches, _, notices = _run(tmp_path, unchecked_family_dir, varied_text, "auto", caplog)
    assert all(b["input_ids"].shape[0] == BATCH and "attention_mask" in b for b in batches)
    assert len(notices) == 1 and "padding-free batches off" in notices[0] and "'olmo'" in notices[0], notices

    with pytest.raises(ConfigError) as err:
        _run(tmp_path, unchecked_family_dir, varied_text, "on", caplog, padding_free=True)
    message = str(err.value)
    assert "training.extra.padding_free" in message and "mix sequences" in message
    assert "set training.extra.padding_free: false" in message

    with pytest.raises(ConfigError, match="training.extra.padding_free='yes': true or false"):
        _run(tmp_path, unchecked_family_dir, varied_text, "bad", caplog, padding_free="yes")
