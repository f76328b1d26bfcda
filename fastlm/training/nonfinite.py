"""Stop training when the loss or the weights become non-finite, before anything non-finite is saved.

`StopOnNonFiniteCallback` (added by `fastlm train`; pass it to any TRL / transformers trainer yourself) checks
- every logged value of `loss` and `grad_norm` (`on_log`), and
- the trainable weights before each checkpoint and at the last step (`on_step_end`, which transformers runs before
  it saves), so a checkpoint never holds inf/nan weights even when the loss of that step was still finite.
On a problem it raises `NonFiniteTrainingError` naming the step, the value, the last complete checkpoint to resume
from, and the usual fix. Raising stops `trainer.train()`, so `fastlm train` saves no result.
"""
from __future__ import annotations

import math
import torch
from transformers import TrainerCallback

from ..errors import FastLMError

__all__ = ["NonFiniteTrainingError", "StopOnNonFiniteCallback", "non_finite_parameters"]


class NonFiniteTrainingError(FastLMError, FloatingPointError):
    """The loss, the gradient norm or a weight became inf or nan during training."""


def non_finite_parameters(model, limit: int = 3) -> list[str]:
    """Names of up to `limit` trainable parameters holding inf or nan."""
    bad = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not bool(torch.isfinite(param).all()):
                bad.append(name)
                if len(bad) >= limit:
                    break
    return bad


class StopOnNonFiniteCallback(TrainerCallback):
    def _stop(self, args, state, what: str) -> None:
        from .checkpoints import find_last_complete_checkpoint

        last = find_last_complete_checkpoint(args.output_dir) if args.output_dir else None
        keep = (f"The last good checkpoint is {last}; resume from it with resume=true (fastlm train) or "
                f"trainer.train(resume_from_checkpoint={str(last)!r}) after the fix."
                if last is not None else "No checkpoint was written before this step.")
        raise NonFiniteTrainingError(
            f"training stopped at step {state.global_step}: {what}. Nothing non-finite was saved. {keep} Fix: lower "
            "the learning rate (and warm it up with warmup_steps), keep max_grad_norm (e.g. 1.0), or check the data "
            "of this step; in fp16 try bf16 or float32.")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                control.should_save = False
                self._stop(args, state, f"the {key.replace('_', ' ')} is {value}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last_step = state.max_steps and state.global_step >= state.max_steps
        if model is None or not (control.should_save or control.should_log or last_step):
            return
        bad = non_finite_parameters(model)
        if bad:
            control.should_save = False
            self._stop(args, state, "weights became inf or nan (" + ", ".join(bad) + ")")
