"""A progress display for people: a tqdm bar with step, loss, learning rate, tokens/s and peak memory.

It replaces transformers' ``ProgressCallback`` (which prints raw log dicts). On a terminal it is one bar whose
postfix is refreshed at every logging step; when standard error is not a terminal (a log file, CI) it prints one
plain line per logging step instead of carriage-return updates. tokens/s and peak memory come from the
``ThroughputCallback`` placed before it (they are read from the ``logs`` dict it fills in).
"""
from __future__ import annotations

import sys

from transformers import TrainerCallback

__all__ = ["ProgressBarCallback", "format_log"]

# a short bar, so that the postfix (loss | lr | tok/s | peak memory) fits on the line
BAR_FORMAT = "{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _fmt_tokens(value) -> str:
    return f"{value:,.0f} tok/s" if value >= 100 else f"{value:.1f} tok/s"


def format_log(logs: dict) -> str:
    """``loss 1.234 | lr 2.00e-04 | 1,234 tok/s | peak 1.23 GB`` from a Trainer log dict (missing values left out)."""
    parts = []
    if isinstance(logs.get("loss"), (int, float)):
        parts.append(f"loss {logs['loss']:.4f}")
    if isinstance(logs.get("eval_loss"), (int, float)):
        parts.append(f"eval_loss {logs['eval_loss']:.4f}")
    if isinstance(logs.get("reward"), (int, float)):  # GRPO
        parts.append(f"reward {logs['reward']:.3f}")
    if isinstance(logs.get("learning_rate"), (int, float)):
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if isinstance(logs.get("tokens_per_second"), (int, float)):
        parts.append(_fmt_tokens(logs["tokens_per_second"]))
    if isinstance(logs.get("peak_memory_gb"), (int, float)):
        parts.append(f"peak {logs['peak_memory_gb']:.2f} GB")
    return " | ".join(parts)


class ProgressBarCallback(TrainerCallback):
    """tqdm bar over optimizer steps (starting at the resumed step) with the latest logged values."""

    def __init__(self, file=None, force_bar: bool | None = None):
        self.file = file
        self.force_bar = force_bar
        self.bar = None
        self._interactive = False

    def _stream(self):
        return self.file or sys.stderr

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        stream = self._stream()
        isatty = getattr(stream, "isatty", lambda: False)()
        self._interactive = isatty if self.force_bar is None else self.force_bar
        if state.global_step:
            self._print(f"resuming at step {state.global_step}/{state.max_steps}")
        if self._interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True, file=stream, bar_format=BAR_FORMAT)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        text = format_log(logs)
        if not text:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
            if "eval_loss" in logs:
                self.bar.write(f"step {state.global_step}: {text}", file=self._stream())
        else:
            self._print(f"step {state.global_step}/{state.max_steps} | {text}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None

    def _print(self, line: str) -> None:
        stream = self._stream()
        if self.bar is not None:
            self.bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)
