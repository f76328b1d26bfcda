"""TRL glue of the `fastlm train` config: the trainer and config classes per trainer type, and the TRL
arguments a TrainConfig stands for (also built by --dry-run, so TRL's own checks run before anything loads)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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


def trl_args(config, output_dir: Path, has_eval: bool):
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
    return cls(**args)
