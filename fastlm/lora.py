"""`FastLanguageModel.get_peft_model`: LoRA over PEFT, with Unsloth's arguments.

Standard target names (q_proj ... down_proj) are translated to a family's own modules through its ArchSpec
(Phi-3's fused qkv_proj / gate_up_proj). `embed_tokens` / `lm_head` in `target_modules` are trained fully, as
`modules_to_save`. Unknown names are an error listing the model's linear modules.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from .errors import ProblemList
from .patch.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from .loading.plan import GRADIENT_CHECKPOINTING_VALUES
from .state import get_state, set_state
from .utils.checks import is_finite_number, non_finite_items
from .utils.noise import quiet_peft_wrap

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULLY_TRAINED_NAMES = ("embed_tokens", "lm_head")
BIAS_VALUES = ("none", "all", "lora_only")
INIT_VALUES = (True, False, "gaussian", "pissa", "olora", "loftq", "eva", "corda", "orthogonal")


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target (quantized ones included; lm_head excluded)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers, which PEFT also adapts

    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.Linear, Conv1D)) and leaf not in FULLY_TRAINED_NAMES:
            names.add(leaf)
    return sorted(names)


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


def _prepare_quantized(model) -> None:
    """k-bit training preparation: freeze the base weights and let gradients flow from the input embeddings
    (needed when checkpointed layers see no input that requires grad). Norms stay in the compute dtype to save
    memory; PEFT's adapters are kept in float32 by autocast_adapter_dtype."""
    from .patch.bnb_cpu import keep_cpu_4bit_trainable

    keep_cpu_4bit_trainable(model)
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()


def align_saved_module_dtypes(model) -> int:
    """Give the fully trained copies (`modules_to_save`: embed_tokens, lm_head) the dtype of the module they replace.

    TRL's trainers cast every trainable parameter of a 4/8-bit model to bfloat16; an embedding copy then returns
    bf16 hidden states and an lm_head copy meets fp32 ones, so generation fails with "expected m1 and m2 to have the
    same dtype". Casting the copies back (in place, `param.data`, so an optimizer holding them stays valid) makes the
    model consistent again, whatever the trainer cast. Returns how many parameters were cast."""
    cast = 0
    for module in model.modules():
        copies, original = getattr(module, "modules_to_save", None), getattr(module, "original_module", None)
        if not isinstance(copies, nn.ModuleDict) or original is None:
            continue
        ref = next((p for p in original.parameters() if p.is_floating_point()), None)
        if ref is None:
            continue
        for copy in copies.values():
            for param in copy.parameters():
                if param.is_floating_point() and param.dtype != ref.dtype:
                    param.data = param.data.to(ref.dtype)
                    cast += 1
    if cast:
        logger.info("fastlm: %d fully trained weights (modules_to_save) cast back to the model's dtype", cast)
    return cast


def get_peft_model(model, r=16, target_modules=DEFAULT_TARGET_MODULES, lora_alpha=16, lora_dropout=0.0, bias="none",
                   layers_to_transform=None, layers_pattern=None, use_gradient_checkpointing="unsloth",
                   random_state=3407, max_seq_length=None, use_rslora=False, modules_to_save=None,
                   init_lora_weights=True, loftq_config=None, **kwargs):
    from peft import LoftQConfig, LoraConfig, PeftModel
    from peft import get_peft_model as peft_get_peft_model

    state = get_state(model)
    if state is not None and state.full_finetuning:
        logger.warning("fastlm: the model was loaded with full_finetuning=True, so every weight is already trained; "
                       "get_peft_model adds no adapters and returns the model unchanged.")
        return model

    p = ProblemList("FastLanguageModel.get_peft_model")
    if isinstance(model, PeftModel):
        p.add("model", type(model).__name__, "a model without LoRA adapters",
              "load the base model again, or train the adapters this model already has (it is trainable)")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        p.add("r", r, "a positive integer rank", "e.g. r=16")
    if not is_finite_number(lora_alpha) or lora_alpha <= 0:
        p.add("lora_alpha", lora_alpha, "a finite positive number", "e.g. lora_alpha=16 (often equal to r)")
    if not is_finite_number(lora_dropout) or not 0 <= lora_dropout < 1:
        p.add("lora_dropout", lora_dropout, "a number in [0, 1)", "use lora_dropout=0")
    if bias not in BIAS_VALUES:
        p.add("bias", bias, f"one of {BIAS_VALUES}", 'use bias="none"')
    if use_gradient_checkpointing not in GRADIENT_CHECKPOINTING_VALUES:
        p.add("use_gradient_checkpointing", use_gradient_checkpointing, "True, False or 'unsloth'", "use 'unsloth'")
    if not (init_lora_weights in INIT_VALUES or (isinstance(init_lora_weights, str)
                                                 and init_lora_weights.startswith(("pissa_niter_", "corda")))):
        p.add("init_lora_weights", init_lora_weights, f"one of {INIT_VALUES} or 'pissa_niter_N'", "use True")
    if random_state is not None and (not isinstance(random_state, int) or isinstance(random_state, bool)):
        p.add("random_state", random_state, "an integer seed or None", "e.g. random_state=3407")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
        p.add("max_seq_length", max_seq_length, "None or a positive integer", "e.g. 2048")

    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if loftq_config is not None and loftq_config != {}:
        if init_lora_weights != "loftq":
            p.add("loftq_config", loftq_config, "used only with init_lora_weights='loftq'",
                  "pass init_lora_weights='loftq' too, or drop loftq_config")
        if quantized:
            p.add("loftq_config", loftq_config, "LoftQ quantizes the weights itself and needs a 16-bit model",
                  "load with load_in_4bit=False")
        if isinstance(loftq_config, dict):
            loftq_config = LoftQConfig(**loftq_config)
    elif init_lora_weights == "loftq":
        p.add("init_lora_weights", "loftq", "needs loftq_config", "pass loftq_config={'loftq_bits': 4}")

    # target modules: translate through the ArchSpec, split out fully trained modules, check names
    spec = state.spec if state is not None else None
    available = linear_module_names(model)
    to_save = list(modules_to_save or [])
    targets: list[str] | str
    if isinstance(target_modules, str):
        targets = target_modules  # "all-linear" or a regular expression, as PEFT reads it
    else:
        targets = []
        unknown = []
        for name in target_modules or []:
            if name in FULLY_TRAINED_NAMES:
                if name not in to_save:
                    to_save.append(name)
                continue
            own = spec.translate_target(name) if spec is not None else name
            if own not in available:
                unknown.append(name)
            elif own not in targets:
                targets.append(own)
        if unknown:
            p.add("target_modules", unknown, "names of linear modules in this model: " + ", ".join(available),
                  "use names from that list (embed_tokens / lm_head are trained fully)")
        if not targets and not to_save:
            p.add("target_modules", target_modules, "at least one module", f"e.g. {list(DEFAULT_TARGET_MODULES)}")
    if layers_to_transform is not None:
        layers = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
        n_layers = getattr(model.config, "num_hidden_layers", None)
        bad = [i for i in layers if not isinstance(i, int) or (n_layers is not None and not 0 <= i < n_layers)]
        if bad:
            p.add("layers_to_transform", bad, f"layer indices in [0, {n_layers})", "use valid layer indices")
        layers_to_transform = layers
    fields = _lora_config_fields()
    extra = {}
    for key, value in kwargs.items():
        for where, bad in non_finite_items(value, key):
            p.add(where, bad, "a finite number", "use a finite value")
        if key not in fields or key in ("task_type", "peft_type"):
            p.add(key, value, "not an argument of get_peft_model or LoraConfig",
                  "remove it or check its spelling (e.g. use_dora=True, rank_pattern={...})")
        else:
            extra[key] = value
    p.raise_if_any()

    if random_state is not None:
        torch.manual_seed(random_state)
    if quantized:
        _prepare_quantized(model)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), bias=bias,
                        target_modules=targets or None, modules_to_save=to_save or None,
                        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                        use_rslora=use_rslora, init_lora_weights=init_lora_weights, loftq_config=loftq_config or {},
                        task_type="CAUSAL_LM", **extra)
    mixed = state.float32_mixed_precision if state is not None else None
    with quiet_peft_wrap():
        peft_model = peft_get_peft_model(model, config, autocast_adapter_dtype=mixed is not False)

    base = peft_model.get_base_model()
    if use_gradient_checkpointing:
        enable_gradient_checkpointing(base, use_gradient_checkpointing)
        if not quantized:
            base.enable_input_require_grads()
    else:
        disable_gradient_checkpointing(base)
    if state is not None:
        state.use_gradient_checkpointing = use_gradient_checkpointing
        if max_seq_length:
            state.max_seq_length = max_seq_length
        set_state(peft_model, state)

    from .patch import refresh_after_lora

    refresh_after_lora(peft_model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("fastlm: LoRA r=%d on %s; %s trainable parameters", r, targets, f"{trainable:,}")
    return peft_model
