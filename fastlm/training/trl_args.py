"""TRL glue of the `fastlm train` config: the trainer and config classes per trainer type, the TRL arguments a
TrainConfig stands for (also built by --dry-run, so TRL's own checks run before anything loads), and the choice of
padding-free SFT batches.

Padding-free batches (TRL's ``padding_free=True``): the collator concatenates a step's sequences into one row with
``position_ids`` restarting at 0 for each sequence and no attention mask, so no pad token is computed. `fastlm
train` turns them on by default for SFT when every attention layer of the loaded model keeps those sequences apart
(`padding_free_problem`): flash attention (varlen from the sequence boundaries) for any family, or SDPA / eager /
flex attention for the families fastlm registers, whose transformers forwards build per-sequence masks from
``position_ids`` (and whose fastlm attention patch runs packed rows sequence by sequence). It stays off with
``trainer.packing`` (TRL's packing decides), a batch of one row (nothing to remove), or ``training.extra.padding_free:
false``; ``training.extra.padding_free: true`` on a model where it is not safe is a ConfigError.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def trl_config_class(trainer_type: str):
    """TRL's config dataclass for a trainer type (ORPO lives in trl.experimental in TRL 1.x)."""
    if trainer_type == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig
    import trl

    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "kto": trl.KTOConfig, "grpo": trl.GRPOConfig}[trainer_type]


def trl_trainer_class(trainer_type: str):
    if trainer_type == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer
    import trl

    return {"sft": trl.SFTTrainer, "dpo": trl.DPOTrainer, "kto": trl.KTOTrainer,
            "grpo": trl.GRPOTrainer}[trainer_type]


def mixed_precision(config) -> dict:
    """bf16/fp16 training flags that match the model's compute dtype (none on CPU)."""
    import torch

    from ..loading.plan import resolve_dtype
    from ..utils.memory import is_bf16_supported

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    dtype = resolve_dtype(None if config.model.dtype == "auto" else config.model.dtype, True, is_bf16_supported())
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def trl_args(config, output_dir: Path, has_eval: bool, padding_free: bool = False):
    """The TRL config of a run. padding_free: the result of `resolve_padding_free` (SFT): TRL's padding_free=True
    with max_length=None (TRL refuses a max_length it would not enforce; `truncate_prepared_datasets` cuts the
    tokenized data to ``model.max_seq_length`` instead, as TRL does for padded batches)."""
    import torch

    cls = trl_config_class(config.trainer.type)
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    t, tr, m = config.training, config.trainer, config.model
    args: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        optim=t.optim, max_grad_norm=t.max_grad_norm, logging_strategy="steps", logging_steps=t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed,
        report_to="none", **mixed_precision(config))
    if not torch.cuda.is_available():
        args["dataloader_pin_memory"] = False
    # TRL's configs turn gradient checkpointing on by default; follow model.use_gradient_checkpointing instead
    # (transformers >= 5.18 calls it activation_checkpointing and warns on the old name)
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    # "unsloth" is fastlm's offloaded checkpointing, already installed on the model: the Trainer enabling its own
    # would put plain checkpointing back on the layers
    args[name] = bool(m.use_gradient_checkpointing) and m.use_gradient_checkpointing != "unsloth"
    if args[name]:
        args[name + "_kwargs"] = {"use_reentrant": False}
    if has_eval:
        args.update(eval_strategy="steps", eval_steps=t.eval_steps or t.save_steps)
    if "max_length" in fields:
        args["max_length"] = m.max_seq_length
    if tr.type == "sft":
        args.update(dataset_text_field="text", packing=tr.packing)
    if tr.beta is not None and "beta" in fields:
        args["beta"] = tr.beta
    if tr.type in ("grpo", "orpo") and "max_completion_length" in fields:
        args["max_completion_length"] = tr.max_completion_length
    if tr.type == "grpo":
        args["num_generations"] = tr.num_generations
        if tr.reward_weights is not None:
            args["reward_weights"] = tr.reward_weights
    args.update(t.extra)
    if padding_free and tr.type == "sft" and not tr.packing:
        args.update(padding_free=True, max_length=None)
    return cls(**args)


# attention implementations whose transformers masks (>= 4.56: masking_utils.find_packed_sequence_indices) keep
# packed sequences apart when the batch has position_ids and no attention mask
_MASKED_PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def _is_flash(impl: str) -> bool:
    return impl.startswith("flash_attention") or "flash-attn" in impl or "flash_attn" in impl


def padding_free_problem(model) -> str | None:
    """Why a padding-free batch (one row of concatenated sequences, restarting position_ids, no attention mask)
    would let this model's sequences attend to each other; None when every layer keeps them apart."""
    from transformers import masking_utils

    from ..arch import lookup

    config = model.config
    model_type = getattr(config, "model_type", None)
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    if _is_flash(impl):
        return None
    if lookup(model_type) is None:
        return (f"the attention of {model_type!r} models ({impl!r}) has not been checked to keep packed sequences "
                f"apart (fastlm checks its registered families; flash attention works for any)")
    if impl not in _MASKED_PACKED_ATTENTION:
        return f"the attention implementation {impl!r} is not flash, sdpa, eager or flex_attention"
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return "this transformers version builds no per-sequence masks from position_ids"
    return None


def resolve_padding_free(config, model) -> bool:
    """Whether this `fastlm train` run uses padding-free SFT batches (see the module docstring). Says so in one
    line; raises ConfigError when ``training.extra.padding_free: true`` is asked of a model it is not safe for."""
    from ..errors import ConfigError, Problem

    tr, t = config.trainer, config.training
    if tr.type != "sft" or tr.packing:
        return False
    asked = t.extra.get("padding_free")
    if asked not in (None, True, False):
        raise ConfigError("fastlm train config", [Problem("training.extra.padding_free", asked, "true or false",
                                                          "set true, false, or leave it out (on where safe)")])
    problem = padding_free_problem(model)
    if asked is True and problem:
        raise ConfigError("fastlm train config", [Problem(
            "training.extra.padding_free", True, f"padding-free batches would mix sequences here: {problem}",
            "set training.extra.padding_free: false (or remove it: fastlm turns it on where it is safe)")])
    if asked is not None:
        on = bool(asked)
    elif problem:
        logger.info("fastlm: padding-free batches off: %s", problem)
        on = False
    else:
        on = t.per_device_train_batch_size > 1
    if on:
        logger.info("fastlm: padding-free batches on: each step's sequences are concatenated into one row with "
                    "per-sequence position_ids, no pad tokens (training.extra.padding_free: false turns it off)")
    return on


def truncate_prepared_datasets(trainer, max_length: int) -> None:
    """Cut the trainer's tokenized datasets to `max_length` tokens as TRL's SFT preparation does for padded batches
    (it skips that with padding_free=True): every per-token column sliced per ``truncation_mode``, rows left with
    no trained label dropped. Untokenized datasets (skip_prepare_dataset) are left as they are, as TRL does."""
    mode = getattr(trainer.args, "truncation_mode", "keep_start")
    if mode not in ("keep_start", "keep_end"):
        from ..errors import ConfigError, Problem

        raise ConfigError("fastlm train config", [Problem("training.extra.truncation_mode", mode,
                                                          "one of 'keep_start', 'keep_end'", "use keep_start")])
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)

    def truncate(example):
        n = len(example["input_ids"])
        return {k: v[cut] for k, v in example.items() if isinstance(v, list) and len(v) == n}

    def trained(example):
        return "labels" not in example or any(label != -100 for label in example["labels"])

    def one(dataset):
        if dataset is None or "input_ids" not in (getattr(dataset, "column_names", None) or ()):
            return dataset
        from datasets import Dataset

        desc = {"desc": f"Truncating to {max_length} tokens (padding-free)"} if isinstance(dataset, Dataset) else {}
        return dataset.map(truncate, **desc).filter(trained)

    trainer.train_dataset = one(trainer.train_dataset)
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {k: one(v) for k, v in trainer.eval_dataset.items()}
    else:
        trainer.eval_dataset = one(trainer.eval_dataset)
