"""Training callbacks: throughput and memory per logging step, and a loss-curve PNG at the end of training.

`ThroughputCallback` counts tokens with the trainer's own counter, ``state.num_input_tokens_seen``. If
``TrainingArguments.include_num_input_tokens_seen`` is off when training begins, the callback turns it to
``"non_padding"``; the Trainer then adds ``attention_mask.sum()`` of every micro-batch (``input_ids != pad`` for
padding-free batches), gathered over all processes, before each forward. This is exact under gradient accumulation,
dataloader worker processes and multi-GPU, which a collator wrapper would not be (workers run the collator in other
processes, and it runs ahead of the step). Side effect: the Trainer's own logs then also carry
``num_input_tokens_seen`` and ``train_tokens_per_second``. If the user chose ``"all"``, padding is counted and the
history says so. TRL's ``SFTTrainer`` log value ``num_tokens`` is the fallback when the state counter stays at 0.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..utils.imports import require
from ..utils.memory import peak_rss_gb

logger = logging.getLogger(__name__)

__all__ = ["ThroughputCallback", "LossPlotCallback", "save_loss_plot", "peak_memory_gb"]

_GIB = 2 ** 30


def peak_memory_gb() -> tuple[float, str]:
    """(peak GiB, kind): CUDA ``max_memory_allocated`` of the current device when CUDA is in use ("cuda_max_allocated"),
    else the process's peak resident set size ("cpu_peak_rss", from `utils.memory.peak_rss_gb`)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / _GIB, "cuda_max_allocated"
    return peak_rss_gb(), "cpu_peak_rss"


class ThroughputCallback(TrainerCallback):
    """Records step, loss, learning rate, tokens/s, peak memory and elapsed time at every logging step.

    ``history``: one dict per logging step with keys ``step, loss, learning_rate, tokens, tokens_per_second,
    peak_memory_gb, memory_kind, elapsed_s`` (``tokens``: tokens counted so far in this ``train()`` call;
    ``tokens_per_second``: over the interval since the previous logging step). ``tokens_per_second`` and
    ``peak_memory_gb`` are also added to the ``logs`` dict (progress bar, printers, later callbacks) and to the
    matching ``state.log_history`` entry. ``summary()`` gives the whole run.
    """

    def __init__(self, count_tokens: bool = True):
        self.count_tokens = count_tokens
        self.history: list[dict[str, Any]] = []
        self.token_count_kind = "unavailable"
        self._start = self._last_time = None
        self._start_tokens = self._last_tokens = 0
        self._end_time = None

    # -- trainer events -------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        mode = getattr(args, "include_num_input_tokens_seen", "no")
        if self.count_tokens and mode in ("no", False, None):
            args.include_num_input_tokens_seen = "non_padding"
            mode = "non_padding"
        self.token_count_kind = {"non_padding": "non-padding tokens", "all": "all tokens (padding included)",
                                 True: "all tokens (padding included)"}.get(mode, "unavailable")
        self.history = []
        self._start = self._last_time = time.perf_counter()
        self._start_tokens = self._last_tokens = int(state.num_input_tokens_seen or 0)
        self._end_time = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self._start is None:
            return
        now = time.perf_counter()
        tokens_total = self._tokens_total(state, logs)
        tokens_per_second = None
        if tokens_total is not None:
            interval = now - self._last_time
            if interval > 0:
                tokens_per_second = (tokens_total - self._last_tokens) / interval
            self._last_tokens = tokens_total
        self._last_time = now
        memory, kind = peak_memory_gb()
        entry = {"step": state.global_step, "loss": _number(logs.get("loss")),
                 "learning_rate": _number(logs.get("learning_rate")),
                 "tokens": None if tokens_total is None else tokens_total - self._start_tokens,
                 "tokens_per_second": tokens_per_second, "peak_memory_gb": memory, "memory_kind": kind,
                 "elapsed_s": now - self._start}
        self.history.append(entry)
        extra = {k: round(v, 3) for k, v in (("tokens_per_second", tokens_per_second), ("peak_memory_gb", memory))
                 if v is not None}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        self._end_time = time.perf_counter()
        if self.history and state.is_world_process_zero:
            # debug only: a progress bar may still own the terminal line here, and `fastlm train` prints the
            # summary itself, formatted; read it with .summary()
            logger.debug("fastlm throughput: %s", self.summary())

    # -- helpers --------------------------------------------------------------------------------------------------
    def _tokens_total(self, state, logs) -> int | None:
        seen = int(state.num_input_tokens_seen or 0)
        if seen > self._start_tokens:
            return seen
        trl_tokens = logs.get("num_tokens")  # TRL SFTTrainer: cumulative non-padding tokens of this trainer
        if isinstance(trl_tokens, (int, float)) and trl_tokens > 0:
            self.token_count_kind = "non-padding tokens (TRL num_tokens)"
            return self._start_tokens + int(trl_tokens)
        return None

    def summary(self) -> dict[str, Any]:
        """Whole run: ``train_time_s, steps, tokens, tokens_per_second, token_count_kind, peak_memory_gb,
        memory_kind, final_loss`` (None where nothing was measured)."""
        if self._start is None:
            return {"train_time_s": None, "steps": 0, "tokens": None, "tokens_per_second": None,
                    "token_count_kind": self.token_count_kind, "peak_memory_gb": None, "memory_kind": None,
                    "final_loss": None}
        end = self._end_time or time.perf_counter()
        elapsed = end - self._start
        tokens = next((h["tokens"] for h in reversed(self.history) if h["tokens"] is not None), None)
        last_time = self.history[-1]["elapsed_s"] if self.history else elapsed
        memory, kind = peak_memory_gb()
        return {"train_time_s": elapsed, "steps": self.history[-1]["step"] if self.history else 0,
                "tokens": tokens, "tokens_per_second": tokens / last_time if tokens and last_time > 0 else None,
                "token_count_kind": self.token_count_kind, "peak_memory_gb": memory, "memory_kind": kind,
                "final_loss": self.history[-1]["loss"] if self.history else None}


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def save_loss_plot(log_history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Writes a PNG of training loss (and eval loss, if logged) against step; returns its path.

    log_history: ``TrainerState.log_history`` (entries with ``step`` and ``loss`` / ``eval_loss``; after a resume it
    already holds the steps before the checkpoint). The file is written to a temporary name in the same folder and
    renamed, so a reader never sees half a PNG. Needs matplotlib (imported here, Agg canvas, no pyplot state).
    """
    require("matplotlib", "the loss plot", "pip install matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        points = {}
        for entry in log_history:
            value = _number(entry.get(key))
            if value is not None and "step" in entry:
                points[int(entry["step"])] = value  # a step logged twice keeps its last value
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, losses = series("loss")
    eval_steps, eval_losses = series("eval_loss")
    if steps:
        ax.plot(steps, losses, marker="." if len(steps) <= 50 else None, label="train loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, marker="o", label="eval loss")
    if not steps and not eval_steps:
        ax.text(0.5, 0.5, "no loss was logged\n(logging_steps larger than the steps run?)", ha="center",
                va="center", transform=ax.transAxes)
    else:
        ax.legend()
        finite = [v for v in losses + eval_losses if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class LossPlotCallback(TrainerCallback):
    """At the end of training writes ``<output_dir>/loss.png`` from ``state.log_history`` (main process only).

    A missing matplotlib or an unwritable folder is reported as a warning; it never fails a finished run.
    ``path`` holds the written file, or None.
    """

    def __init__(self, filename: str = "loss.png"):
        self.filename = filename
        self.path: Path | None = None

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not args.output_dir:
            return
        try:
            self.path = save_loss_plot(state.log_history, Path(args.output_dir) / self.filename)
        except (ImportError, OSError) as exc:
            logger.warning("fastlm: could not write the loss plot: %s", exc)
            return
        logger.info("fastlm: loss curve written to %s", self.path)
