"""`train_from_config`: the whole `fastlm train` run as a Python call.

Order (nothing heavy happens before every check has passed):
1. the config is validated (`load_config` / `config_from_dict`);
2. the output directory is checked (checkpoints of an earlier run need ``resume=true`` or ``output.overwrite``) and
   the data is loaded and its format checked against the trainer; problems of both are reported together;
3. the model is loaded with `FastLanguageModel.from_pretrained`, LoRA added with `get_peft_model`;
4. the data is rendered for the trainer (chat template), the TRL trainer is built with fastlm's callbacks
   (throughput, progress bar, checkpoint completion marker, loss plot) and trained, resuming from the newest
   complete checkpoint when ``resume`` is set; SFT batches are padding-free where the loaded model keeps packed
   sequences apart (`training.trl_args.resolve_padding_free`; ``training.extra.padding_free: false`` turns it off);
5. the adapter (or full model) and tokenizer, ``trainer_state.json``, ``loss.png`` and ``summary.json`` are
   written to ``output.dir``.

    from fastlm import train_from_config
    result = train_from_config("examples/quickstart.yaml", ["training.max_steps=5"])
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..training.checkpoints import CheckpointCompletionCallback, list_checkpoints, remove_incomplete_checkpoints
from ..training.config import TrainConfig, config_from_dict, load_config
from ..training.preflight import check_before_loading
from ..training.trl_args import trl_config_class, trl_trainer_class  # noqa: F401  (names of this module)
from ..training.trl_args import resolve_padding_free, trl_args, truncate_prepared_datasets

logger = logging.getLogger(__name__)

__all__ = ["train_from_config", "check_before_loading", "TrainResult", "trl_config_class", "trl_trainer_class", "build_trainer",
           "load_model_for_config"]


@dataclass
class TrainResult:
    """What a run produced. `summary` holds train_time_s, tokens_per_second, peak_memory_gb, final_loss, ..."""

    output_dir: Path
    global_step: int
    max_steps: int
    final_loss: float | None
    summary: dict
    resumed_from: Path | None
    loss_plot: Path | None
    model_dir: Path | None
    log_history: list = field(repr=False, default_factory=list)
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)
    trainer: Any = field(repr=False, default=None)


def _as_config(config, overrides: Iterable[str]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        if overrides:
            return config_from_dict(config.to_dict(), overrides, base_dir=config.base_dir)
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config, overrides)
    return load_config(config, overrides)


def load_model_for_config(config: TrainConfig):
    """(model, tokenizer) per ``config.model`` and ``config.lora``: LoRA added unless full fine-tuning, or kept
    trainable when ``model.name`` is an adapter directory."""
    from ..api import FastLanguageModel

    m, lora = config.model, config.lora
    model, tokenizer = FastLanguageModel.from_pretrained(
        m.name, max_seq_length=m.max_seq_length, dtype=None if m.dtype == "auto" else m.dtype,
        load_in_4bit=m.precision == "4bit", load_in_8bit=m.precision == "8bit",
        load_in_16bit=m.precision == "16bit", full_finetuning=m.full_finetuning,
        use_gradient_checkpointing=m.use_gradient_checkpointing, trust_remote_code=m.trust_remote_code,
        revision=m.revision, random_state=config.training.seed)
    if m.chat_template:
        from ..training.chat_templates import install_chat_template

        tokenizer = install_chat_template(model, tokenizer, m.chat_template)
    if m.full_finetuning:
        return model, tokenizer
    from peft import PeftModel

    if isinstance(model, PeftModel):
        logger.warning("fastlm: %s is a LoRA adapter; training it further (the lora section is not used)", m.name)
        return model, tokenizer
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, target_modules=lora.target_modules, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        bias=lora.bias, use_gradient_checkpointing=m.use_gradient_checkpointing, random_state=lora.random_state,
        max_seq_length=m.max_seq_length, use_rslora=lora.use_rslora)
    return model, tokenizer


def build_trainer(config: TrainConfig, model, tokenizer, train_dataset, eval_dataset, output_dir: Path,
                  callbacks: Iterable = ()):
    """The TRL trainer of ``config.trainer.type`` with fastlm's callbacks in place of transformers' progress
    printer: ThroughputCallback (tokens/s, peak memory) -> ProgressBarCallback -> CheckpointCompletionCallback ->
    LossPlotCallback, then `callbacks`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..training.progress import ProgressBarCallback

    own: list = []
    try:
        from ..training.callbacks import LossPlotCallback, ThroughputCallback
    except ImportError:  # pragma: no cover - callbacks.py is part of fastlm; tolerate a partial checkout
        LossPlotCallback = ThroughputCallback = None
    if ThroughputCallback is not None:
        own.append(ThroughputCallback())
    from ..training.nonfinite import StopOnNonFiniteCallback

    own += [ProgressBarCallback(), StopOnNonFiniteCallback(), CheckpointCompletionCallback()]
    if config.output.loss_plot and LossPlotCallback is not None:
        own.append(LossPlotCallback())
    kind = config.trainer.type
    # padding-free SFT batches where the model keeps packed sequences apart (trl_args.py says when)
    padding_free = resolve_padding_free(config, model)
    args = trl_args(config, output_dir, eval_dataset is not None, padding_free)
    kwargs: dict[str, Any] = dict(model=model, args=args,
                                  train_dataset=train_dataset, processing_class=tokenizer,
                                  callbacks=own + list(callbacks))
    if eval_dataset is not None:
        kwargs["eval_dataset"] = eval_dataset
    if kind == "grpo":
        from ..training.rewards import get_reward_function

        kwargs["reward_funcs"] = [get_reward_function(n) for n in config.trainer.reward_functions]
    trainer = trl_trainer_class(kind)(**kwargs)
    if padding_free and not config.trainer.packing:
        truncate_prepared_datasets(trainer, config.model.max_seq_length)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if kind == "sft" and config.trainer.train_on_responses_only:
        from ..training.response_masking import train_on_responses_only

        trainer = train_on_responses_only(trainer)
    return trainer


def _final_loss(log_history: list) -> float | None:
    for entry in reversed(log_history):
        if isinstance(entry.get("loss"), (int, float)) and math.isfinite(entry["loss"]):
            return float(entry["loss"])
    return None


def format_summary(summary: dict) -> str:
    def num(key, fmt, unit=""):
        value = summary.get(key)
        return "n/a" if value is None else format(value, fmt) + unit

    lines = [
        f"steps        {summary.get('global_step')}/{summary.get('max_steps')}"
        + (f" (resumed from step {summary['resumed_from_step']})" if summary.get("resumed_from_step") else ""),
        f"time         {num('train_time_s', '.1f', ' s')}",
        f"tokens/s     {num('tokens_per_second', ',.0f')}",
        f"peak memory  {num('peak_memory_gb', '.2f', ' GB')}"
        + (f" ({summary['memory_kind']})" if summary.get("memory_kind") else ""),
        f"final loss   {num('final_loss', '.4f')}",
        f"output       {summary.get('output_dir')}",
    ]
    if summary.get("loss_plot"):
        lines.append(f"loss curve   {summary['loss_plot']}")
    return "\n".join(lines)


def _fix_model_card(output_dir: Path, model_name: str) -> None:
    """TRL's model card names the base model only when it came from the hub and the result only when it is pushed
    to the hub; otherwise it writes "[None](https://huggingface.co/None)" and `model="None"`. Name the model the
    run was given and the directory the result is in instead."""
    card = output_dir / "README.md"
    if not card.is_file():
        return
    text = card.read_text()
    local = Path(model_name).expanduser().exists()
    link = f"`{model_name}` (a local model)" if local else f"[{model_name}](https://huggingface.co/{model_name})"
    fixed = text.replace("[None](https://huggingface.co/None)", link).replace('model="None"',
                                                                              f'model="{output_dir}"')
    if fixed != text:
        card.write_text(fixed)


def train_from_config(config: TrainConfig | Mapping | str | os.PathLike, overrides: Iterable[str] = (), *,
                      callbacks: Iterable = (), verbose: bool = True, keep_objects: bool = False) -> TrainResult:
    """Runs a training config end to end and returns a `TrainResult`.

    config: a `TrainConfig`, a mapping in the YAML's shape, or the path of a YAML file; `overrides` are
        ``key=value`` strings applied on top. All problems of the config, the output directory and the data are
        raised as one `ConfigError` before the model is loaded.
    resume (``config.resume``): continue from the newest complete checkpoint in ``output.dir`` (one whose
        completion marker was written after the Trainer finished it); folders left half-written by a killed
        process are skipped and removed. With no complete checkpoint the run starts at step 0.
    callbacks: further `transformers.TrainerCallback` objects. verbose: print the summary at the end.
    keep_objects: also return the model, tokenizer and trainer in the result.
    """
    config = _as_config(config, overrides)
    output_dir, resume_from, data = check_before_loading(config)

    if config.resume:
        removed = remove_incomplete_checkpoints(output_dir)
        for folder in removed:
            logger.warning("fastlm: removed the incomplete checkpoint %s", folder)
    elif config.output.overwrite:
        for folder in list_checkpoints(output_dir):
            shutil.rmtree(folder)
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        logger.warning("fastlm: resuming from %s", resume_from)

    model, tokenizer = load_model_for_config(config)
    from ..training.data_loading import format_for_trainer

    kind = config.trainer.type
    if data.format in ("messages", "sharegpt", "instruction") and not getattr(tokenizer, "chat_template", None):
        from ..training.chat_templates import install_chat_template

        logger.warning("fastlm: the tokenizer has no chat template; using chatml (set model.chat_template to "
                       "choose another)")
        tokenizer = install_chat_template(model, tokenizer, "chatml")
    train_dataset = format_for_trainer(data.train, data.format, kind, tokenizer)
    eval_dataset = format_for_trainer(data.eval, data.format, kind, tokenizer)
    if config.trainer.fix_untrained_tokens:
        from ..training.untrained_tokens import fix_untrained_tokens

        fix_untrained_tokens(model, tokenizer, train_dataset)

    trainer = build_trainer(config, model, tokenizer, train_dataset, eval_dataset, output_dir, callbacks)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    trainer.save_state()

    model_dir = None
    if config.output.save_model:
        trainer.save_model(str(output_dir))
        if getattr(trainer, "processing_class", None) is None:
            tokenizer.save_pretrained(str(output_dir))
        _fix_model_card(output_dir, config.model.name)
        model_dir = output_dir
    state = trainer.state
    throughput = next((cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "summary")), None)
    summary = dict(throughput.summary()) if throughput is not None else {}
    plot = output_dir / "loss.png"
    summary.update(global_step=state.global_step, max_steps=state.max_steps, final_loss=_final_loss(state.log_history),
                   output_dir=str(output_dir), loss_plot=str(plot) if plot.is_file() else None,
                   resumed_from=str(resume_from) if resume_from else None,
                   resumed_from_step=int(resume_from.name.split("-")[-1]) if resume_from else None,
                   trainer=kind, model=config.model.name)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if verbose and state.is_world_process_zero:
        print("\n" + format_summary(summary), file=sys.stderr, flush=True)
    return TrainResult(output_dir=output_dir, global_step=state.global_step, max_steps=state.max_steps,
                       final_loss=summary["final_loss"], summary=summary, resumed_from=resume_from,
                       loss_plot=plot if plot.is_file() else None, model_dir=model_dir,
                       log_history=list(state.log_history), model=model if keep_objects else None,
                       tokenizer=tokenizer if keep_objects else None, trainer=trainer if keep_objects else None)
