"""The load pipeline: source -> checks -> transformers from_pretrained with the quantization config -> tokenizer
repairs -> ArchSpec lookup -> instance patches -> fastlm methods. `plan` is already validated."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..arch import lookup
from ..errors import ConfigError, ModelSourceError, Problem
from ..state import FastLMState, set_state
from .plan import LoadPlan
from .source import ModelSource, resolve_model_source
from .tokenizer import fix_tokenizer
from .weights_check import check_safetensors_files

logger = logging.getLogger(__name__)
_noticed_unknown: set[str] = set()
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_weight_files(path: Path, allow_pickle: bool) -> None:
    """Refuse pickle weights (.bin/.pt) unless the user opted in; safetensors is the default."""
    files = [f.name for f in path.iterdir()] if path.is_dir() else []
    if any(f.endswith(".safetensors") for f in files):
        check_safetensors_files(path)
        return
    pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth")) and "training_args" not in f]
    if pickled and not allow_pickle:
        raise ModelSourceError(
            f"{path} holds weights only as pickle files ({', '.join(sorted(pickled)[:3])}), which can run code "
            "when loaded. Fix: convert them to safetensors, or if you trust the source opt in with "
            "use_safetensors=False.")
    if not pickled and not files:
        raise ModelSourceError(f"{path} is empty. Fix: pass a directory that holds a saved model.")


def _device_map(plan: LoadPlan):
    dm = plan.device_map
    if torch.cuda.is_available():
        if dm in ("sequential", None):
            return {"": torch.cuda.current_device()}
        return dm
    if dm in ("sequential", "auto", None, "cpu"):
        return "cpu"
    return dm


def _quantization_config(plan: LoadPlan):
    from transformers import BitsAndBytesConfig

    if plan.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=plan.dtype)
    if plan.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if plan.quantization in ("fp8-row", "fp8-block"):
        from .fp8 import fp8_quantization_config

        return fp8_quantization_config(plan.quantization)
    if plan.quantization == "custom":
        return plan.hf_kwargs["quantization_config"]
    return None


def _existing_quantization(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("load_in_4bit"):
        return "nf4" if qc.get("bnb_4bit_quant_type", "nf4") == "nf4" else "fp4"
    if qc.get("load_in_8bit"):
        return "int8"
    return str(qc.get("quant_method", "quantized"))


def apply_rope_scaling(config, max_seq_length: int, rope_scaling: dict | None) -> float | None:
    """Scale RoPE when max_seq_length exceeds the model's context (linear unless `rope_scaling` says otherwise).
    Returns the factor applied, or None."""
    max_pos = getattr(config, "max_position_embeddings", None)
    if rope_scaling is None and (max_pos is None or max_seq_length <= max_pos):
        return None
    params = getattr(config, "rope_parameters", None)
    if not params and getattr(config, "rope_theta", None) is None:
        return None  # no RoPE (learned positions): nothing to scale; the caller caps max_seq_length
    params = params or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope_scaling is not None:
        update = dict(rope_scaling)
        if "type" in update:
            update["rope_type"] = update.pop("type")
    else:
        update = {"rope_type": "linear", "factor": float(max_seq_length) / float(max_pos)}
    if max_pos and update.get("rope_type") in ("yarn", "longrope", "llama3"):
        update.setdefault("original_max_position_embeddings", max_pos)
    nested = all(isinstance(v, dict) for v in params.values())
    if nested:  # per-layer-type RoPE (Gemma 3): scale the global layers, where long context lives
        keys = ["full_attention"] if "full_attention" in params else list(params)
        params = {k: ({**v, **update} if k in keys else v) for k, v in params.items()}
    else:
        params = {**params, **update}
    config.rope_parameters = params
    if max_pos and max_seq_length > max_pos:
        config.max_position_embeddings = max_seq_length
    return update.get("factor")


def load_model_and_tokenizer(plan: LoadPlan, auto_model=None):
    from ..utils.noise import silence_known_noise

    silence_known_noise()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    auto_model = auto_model or AutoModelForCausalLM
    source = resolve_model_source(plan.model_name, plan.revision, plan.token, plan.use_exact_model_name)
    adapter_source: ModelSource | None = None
    if source.is_adapter:
        adapter_source = source
        try:
            source = resolve_model_source(source.adapter_base, None, plan.token, plan.use_exact_model_name)
        except ModelSourceError as exc:
            raise ModelSourceError(
                f"{adapter_source.path} is a LoRA adapter whose base model {source.adapter_base!r} (the "
                f"base_model_name_or_path in {adapter_source.path / 'adapter_config.json'}) cannot be loaded: "
                f"{str(exc).split(' Fix:')[0]} "
                "Fix: put the base model back at that path, or edit base_model_name_or_path in adapter_config.json "
                "to where the base model is now.") from exc
    check_weight_files(source.path, plan.allow_pickle)

    common = dict(trust_remote_code=plan.trust_remote_code, token=plan.token)
    config = AutoConfig.from_pretrained(source.path, **common)
    existing = _existing_quantization(config)
    quantization = plan.quantization
    if existing is not None:
        asked = {"nf4": plan.explicit_4bit, "int8": plan.load_in_8bit}
        if any(v for k, v in asked.items() if k != existing) or plan.full_finetuning:
            raise ConfigError("FastLanguageModel.from_pretrained", [Problem(
                "model_name", plan.model_name, f"this checkpoint is already quantized ({existing}) and loads as it is",
                "drop the load_in_* / full_finetuning arguments, or load the original 16-bit model")])
        quantization = existing
    max_pos = getattr(config, "max_position_embeddings", None)
    scale = apply_rope_scaling(config, plan.max_seq_length, plan.rope_scaling)
    if scale:
        logger.warning("fastlm: max_seq_length=%d exceeds the model's context; RoPE scaled by %.3g",
                       plan.max_seq_length, scale)
    elif max_pos and plan.max_seq_length > max_pos and getattr(config, "max_position_embeddings", 0) == max_pos:
        logger.warning("fastlm: %s has learned positions for %d tokens and no RoPE to scale; max_seq_length %d is "
                       "capped to %d", config.model_type, max_pos, plan.max_seq_length, max_pos)
        plan.max_seq_length = max_pos

    if plan.random_state is not None:
        torch.manual_seed(plan.random_state)
    kwargs = {k: v for k, v in plan.hf_kwargs.items() if k != "quantization_config"}
    qconfig = None if existing is not None else _quantization_config(plan)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = auto_model.from_pretrained(source.path, config=config, dtype=plan.dtype, device_map=_device_map(plan),
                                       use_safetensors=None if plan.allow_pickle else True, **common, **kwargs)

    tok_dir = adapter_source.path if adapter_source and any(
        (adapter_source.path / f).is_file() for f in _TOKENIZER_FILES) else source.path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, **common)
    added = fix_tokenizer(tokenizer, plan.max_seq_length) if plan.fix_tokenizer else []
    _resize_embeddings(model, tokenizer, added, plan.resize_model_vocab)

    spec = lookup(config.model_type)
    if spec is None and config.model_type not in _noticed_unknown:
        _noticed_unknown.add(config.model_type)
        logger.warning("fastlm: no fast path for model_type %r yet; it loads and trains through the plain "
                       "transformers forward.", config.model_type)
    state = FastLMState(max_seq_length=plan.max_seq_length, tokenizer=tokenizer, spec=spec,
                        quantization=quantization, full_finetuning=plan.full_finetuning,
                        use_gradient_checkpointing=plan.use_gradient_checkpointing,
                        float32_mixed_precision=plan.float32_mixed_precision, source=source,
                        adapter_source=adapter_source)
    set_state(model, state)
    _install_patches(model, plan, quantization)
    if plan.full_finetuning:
        from ..patch.checkpointing import enable_gradient_checkpointing

        for p in model.parameters():
            p.requires_grad_(True)
        enable_gradient_checkpointing(model, plan.use_gradient_checkpointing)
    if adapter_source is not None:
        from peft import PeftModel

        from ..patch import refresh_after_lora
        from ..utils.noise import quiet_peft_wrap

        with quiet_peft_wrap():
            model = PeftModel.from_pretrained(model, str(adapter_source.path), is_trainable=True)
        refresh_after_lora(model)
    return model, tokenizer


def _resize_embeddings(model, tokenizer, added: list[str], resize_model_vocab: int | None) -> None:
    target = resize_model_vocab or (len(tokenizer) if added else None)
    current = model.get_input_embeddings().weight.shape[0]
    if resize_model_vocab is not None and resize_model_vocab < len(tokenizer):
        raise ConfigError("FastLanguageModel.from_pretrained", [Problem(
            "resize_model_vocab", resize_model_vocab, f"at least the tokenizer's size ({len(tokenizer)})",
            f"use resize_model_vocab={len(tokenizer)} or larger")])
    if target is not None and target > current or resize_model_vocab is not None and target != current:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            logger.info("fastlm: resizing the (unquantized) embedding of a quantized model to %d", target)
        model.resize_token_embeddings(target)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def _install_patches(model, plan: LoadPlan, quantization: str | None) -> None:
    from ..patch import PatchOptions, apply

    apply(model, PatchOptions(quantization=quantization, offload_embedding=plan.offload_embedding,
                              tiled_mlp=plan.unsloth_tiled_mlp))
