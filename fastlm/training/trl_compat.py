"""TRL glue: stable import locations for TRL's trainers, and a callback that keeps QLoRA adapters in float32.

fastlm models are plain transformers / PEFT models, so TRL's trainers take them unchanged. This module finds where
a TRL release keeps each trainer, and offers one opt-in callback for a TRL choice that overrides fastlm's.

Trainer locations. TRL moves trainers between its stable and experimental namespaces:
in TRL 1.16 `ORPOTrainer` lives only in `trl.experimental.orpo`, while `KTOTrainer` is stable (`trl.KTOTrainer`;
`trl.experimental.kto` remains as a deprecated alias). Each name is looked up in an ordered list of modules, the
first that has it wins, so code written against fastlm keeps working when TRL moves a trainer again.

    from fastlm.training.trl_compat import ORPOConfig, ORPOTrainer      # lazy names
    trainers = get_trainer_classes(); trainers.KTOTrainer                # all of them at once

QLoRA adapter dtype. fastlm (through PEFT's `autocast_adapter_dtype`) keeps LoRA weights in float32 over a 16-bit or
quantized base. TRL's SFT, DPO, KTO, GRPO (and RLOO, reward, distillation) trainers cast every trainable parameter
of a 4-/8-bit model to bfloat16 in `__init__`, following the QLoRA paper, whatever the model's compute dtype (also
on fp16-only GPUs and on CPU). Training then updates bf16 weights without a float32 copy, so steps smaller than
bf16's resolution (~0.4% of a weight) are lost. `KeepAdapterDtypeCallback` casts the LoRA weights back to float32
when the trainer finishes initialising (before the optimizer exists), through the public callback API:

    trainer = SFTTrainer(model=model, args=args, ..., callbacks=[KeepAdapterDtypeCallback()])

Generation on the engine. fastlm models serve a trainer's generation step (TRL's GRPO without vLLM calls
`model.generate` on the model it trains) with the fastlm engine, using the weights being trained
(`fastlm.inference.train_generate`). `EngineGenerationCallback` scopes that to one training run: it installs the
hook on any model TRL trains (also one not loaded by fastlm) at the start and removes it, freeing the engine, at the
end; with `use_vllm` or `use_transformers_continuous_batching` it says that TRL's generation is used instead.

    trainer = GRPOTrainer(model=model, args=args, ..., callbacks=[EngineGenerationCallback()])

Gradient accumulation needs no glue: with transformers >= 5.17 and TRL 1.x, `SFTTrainer` divides each micro-batch's
summed token loss by the number of label tokens in the whole accumulation window (`num_items_in_batch`), so
batch 1 x 4 steps and batch 4 x 1 step give the same loss and gradients (tests/training/test_grad_accumulation.py).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
from transformers import TrainerCallback

from ..errors import FastLMError
from ..state import get_state
from ..utils.imports import require

__all__ = ["TrainerClasses", "get_trainer_classes", "TRAINER_LOCATIONS", "KeepAdapterDtypeCallback",
           "restore_adapter_dtype", "EngineGenerationCallback"]

logger = logging.getLogger(__name__)

# name -> modules to look in, preferred first (stable namespace before the experimental one where TRL promoted a
# trainer; the experimental one first where TRL demoted it)
TRAINER_LOCATIONS: dict[str, tuple[str, ...]] = {
    "SFTTrainer": ("trl",), "SFTConfig": ("trl",),
    "DPOTrainer": ("trl",), "DPOConfig": ("trl",),
    "GRPOTrainer": ("trl",), "GRPOConfig": ("trl",),
    "KTOTrainer": ("trl", "trl.experimental.kto"), "KTOConfig": ("trl", "trl.experimental.kto"),
    "ORPOTrainer": ("trl.experimental.orpo", "trl"), "ORPOConfig": ("trl.experimental.orpo", "trl"),
}


@dataclass(frozen=True)
class TrainerClasses:
    """TRL's trainer and config classes, wherever the installed TRL keeps them."""

    SFTTrainer: type
    SFTConfig: type
    DPOTrainer: type
    DPOConfig: type
    ORPOTrainer: type
    ORPOConfig: type
    KTOTrainer: type
    KTOConfig: type
    GRPOTrainer: type
    GRPOConfig: type


def _resolve(name: str) -> type:
    require("trl", f"fastlm.training.trl_compat.{name}", 'pip install "fastlm[train]"')
    tried = []
    for module_name in TRAINER_LOCATIONS[name]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            tried.append(f"{module_name} (not importable)")
            continue
        found = getattr(module, name, None)
        if found is not None:
            return found
        tried.append(f"{module_name} (no {name})")
    import trl

    raise FastLMError(f"{name} was not found in TRL {getattr(trl, '__version__', '?')}; looked in: "
                      f"{', '.join(tried)}. Fix: install a TRL release that has it (pip install 'trl>=1.0'), "
                      f"or import it from where your TRL keeps it.")


@lru_cache(maxsize=1)
def get_trainer_classes() -> TrainerClasses:
    """All of TRL's SFT / DPO / ORPO / KTO / GRPO trainer and config classes (imports TRL on first call)."""
    return TrainerClasses(**{f.name: _resolve(f.name) for f in fields(TrainerClasses)})


def restore_adapter_dtype(model, dtype: torch.dtype = torch.float32) -> int:
    """Cast trainable LoRA weights (parameters named `lora_*`) held in bfloat16 / float16 to `dtype`, in place
    (`param.data`, so optimizers holding the parameters stay valid). Returns how many were cast. A model loaded
    with `float32_mixed_precision=False` asked for low-precision adapters and is left alone."""
    state = get_state(model) if model is not None else None
    if model is None or (state is not None and state.float32_mixed_precision is False):
        return 0
    cast = 0
    for name, param in model.named_parameters():
        if (param.requires_grad and "lora_" in name and param.dtype in (torch.bfloat16, torch.float16)
                and param.dtype != dtype):
            param.data = param.data.to(dtype)
            cast += 1
    if cast:
        logger.info("fastlm: %d LoRA weights cast back to %s after the trainer's cast", cast, dtype)
    from ..lora import align_saved_module_dtypes

    return cast + align_saved_module_dtypes(model)


class KeepAdapterDtypeCallback(TrainerCallback):
    """Keep LoRA weights in float32 (fastlm's and PEFT's default) under TRL trainers that cast a quantized model's
    trainable parameters to bfloat16. Runs at the end of `Trainer.__init__` (before the optimizer is built) and
    again at the start of training, for callbacks added with `trainer.add_callback` after initialisation."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def on_init_end(self, args, state, control, model=None, **kwargs):
        restore_adapter_dtype(model, self.dtype)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        restore_adapter_dtype(model, self.dtype)


class EngineGenerationCallback(TrainerCallback):
    """The trainer's generation step on the fastlm engine for one training run (see the module docstring).

    fuse: passed to `install_training_generate` (None: fused weight copies where they stay exact)."""

    # TrainingArguments fields with which TRL generates without calling model.generate
    OTHER_GENERATORS = ("use_vllm", "use_transformers_continuous_batching")

    def __init__(self, fuse: bool | None = None):
        if fuse not in (None, True, False):
            raise ValueError(f"fuse={fuse!r}: use None (automatic), True or False")
        self.fuse = fuse
        self.installed_on = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..inference.train_generate import install_training_generate, training_generate_installed

        other = [name for name in self.OTHER_GENERATORS if getattr(args, name, False)]
        if other:
            logger.warning("fastlm: %s=True: TRL generates with its own backend, not the fastlm engine", other[0])
            return
        if model is None:
            return
        was_installed = training_generate_installed(model)
        install_training_generate(model, fuse=self.fuse)
        self.installed_on = None if was_installed else model

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from ..inference.train_generate import release_training_engine, remove_training_generate

        if self.installed_on is not None:
            remove_training_generate(self.installed_on)
            self.installed_on = None
        elif model is not None:
            release_training_engine(model)


def __getattr__(name: str):
    if name in TRAINER_LOCATIONS:
        return _resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
