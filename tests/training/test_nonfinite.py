"""A run whose weights or loss become non-finite stops with an error naming the step and the last good
checkpoint; that checkpoint stays, and nothing non-finite is saved as the result."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from fastlm.training.nonfinite import NonFiniteTrainingError, StopOnNonFiniteCallback
from fastlm.jobs.train import train_from_config


def _config(tiny_llama_dir, tmp_path, **training):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello world number {i}"}) + "\n" for i in range(8)))
    return {"model": {"name": str(tiny_llama_dir), "precision": "16bit", "max_seq_length": 32},
            "lora": {"r": 4}, "data": {"path": str(data)},
            "training": {"max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 2,
                         "gradient_accumulation_steps": 1, "logging_steps": 1, **training},
            "output": {"dir": str(tmp_path / "out"), "loss_plot": False}}


class PoisonAfterStep(TrainerCallback):
    """Turns one LoRA weight to nan after the optimizer step `step` (as an fp16 overflow would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(math.nan)


def test_weights_turning_nan_stop_the_run_and_keep_the_last_good_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteTrainingError) as info:
        train_from_config(_config(tiny_llama_dir, tmp_path), callbacks=[PoisonAfterStep(3)], verbose=False)
    text = str(info.value)
    # found at the next check (step 4, a logging and checkpoint step), before checkpoint-4 is written
    assert "training stopped at step 4: weights became inf or nan" in text, text
    assert f"The last good checkpoint is {out / 'checkpoint-2'}" in text and "resume=true" in text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()


def test_huge_learning_rate_stops_with_the_step_and_saves_nothing(tiny_llama_dir, tmp_path, capsys):
    """The finite sibling of learning_rate=.inf (which the config rejects): the run must not exit 0 with a
    NaN adapter."""
    from fastlm.cli.main import main
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(tiny_llama_dir, tmp_path, learning_rate=1e30, max_grad_norm=0,
                                          lr_scheduler_type="constant")))
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"training stopped at step [12]: (weights became inf or nan|the loss is)", err), err[-2000:]
    assert "Fix: lower the learning rate" in err
    # the first checkpoint (step 2) would already hold non-finite weights: none is written, nor the adapter
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_callback_stops_on_a_logged_nan_loss(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl(should_save=True)
    state.global_step = 7
    with pytest.raises(NonFiniteTrainingError, match="step 7: the loss is nan.*No checkpoint was written"):
        StopOnNonFiniteCallback().on_log(args, state, control, logs={"loss": math.nan})
    assert control.should_save is False
