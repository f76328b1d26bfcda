"""Public facades with Unsloth's signatures: `FastLanguageModel` and the generic `FastModel`."""
from __future__ import annotations

import functools

import torch

from . import lora, modes
from .loading.embedded import EMBEDDED_MODEL_NAME
from .loading.loader import load_model_and_tokenizer
from .loading.plan import DEFAULT_4BIT, build_load_plan
from .state import base_model_of
from .utils.memory import is_bf16_supported


def _attach_methods(model) -> None:
    """fastlm's methods (modes, save guard, exports, fast_generate) on the transformers model and, when there is
    one, on its PEFT wrapper."""
    from .export.methods import attach_export_methods
    from .inference.attach import attach_inference_methods

    base = base_model_of(model)
    for target in (base, model) if base is not model else (base,):
        modes.attach_methods(target)
        attach_export_methods(target)
        attach_inference_methods(target)


def _cuda_capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


class FastLanguageModel:
    """Load, adapt and switch modes of causal language models. Returns real transformers / PEFT objects."""

    @staticmethod
    def from_pretrained(model_name=EMBEDDED_MODEL_NAME, max_seq_length=2048, dtype=None, load_in_4bit=DEFAULT_4BIT,
                        load_in_8bit=False, load_in_16bit=False, full_finetuning=False, token=None,
                        device_map="sequential", rope_scaling=None, fix_tokenizer=True, trust_remote_code=False,
                        use_gradient_checkpointing="unsloth", resize_model_vocab=None, revision=None,
                        use_exact_model_name=False, offload_embedding=False, float32_mixed_precision=None,
                        fast_inference=False, gpu_memory_utilization=0.5, float8_kv_cache=False, random_state=3407,
                        max_lora_rank=64, disable_log_stats=True, qat_scheme=None, load_in_fp8=False,
                        unsloth_tiled_mlp=False, *args, auto_model=None, **kwargs):
        """Load `(model, tokenizer)`.

        `model_name` is a local directory (a model, a saved quantized model, or a LoRA adapter whose base is then
        loaded), a name in the local Hugging Face cache, the embedded default model, or a hub name when the hub is
        reachable. `dtype=None` picks bf16 (or fp16) on GPUs and fp32 on CPU. 4-bit is bitsandbytes NF4 with double
        quantization; asking for 8-bit, 16-bit, FP8 or full fine-tuning switches the default 4-bit off. All
        invalid arguments are reported together before any weight is read.
        """
        on_cuda = torch.cuda.is_available()
        plan = build_load_plan(
            model_name=model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit, load_in_16bit=load_in_16bit, full_finetuning=full_finetuning, token=token,
            device_map=device_map, rope_scaling=rope_scaling, fix_tokenizer=fix_tokenizer,
            trust_remote_code=trust_remote_code, use_gradient_checkpointing=use_gradient_checkpointing,
            resize_model_vocab=resize_model_vocab, revision=revision, use_exact_model_name=use_exact_model_name,
            offload_embedding=offload_embedding, float32_mixed_precision=float32_mixed_precision,
            fast_inference=fast_inference, gpu_memory_utilization=gpu_memory_utilization,
            float8_kv_cache=float8_kv_cache, random_state=random_state, max_lora_rank=max_lora_rank,
            disable_log_stats=disable_log_stats, qat_scheme=qat_scheme, load_in_fp8=load_in_fp8,
            unsloth_tiled_mlp=unsloth_tiled_mlp, extra_args=args, kwargs=kwargs, on_cuda=on_cuda,
            bf16_ok=is_bf16_supported(), cuda_capability=_cuda_capability())
        model, tokenizer = load_model_and_tokenizer(plan, auto_model=auto_model)
        if qat_scheme is not None:
            from .export.qat import prepare_qat

            prepare_qat(model, qat_scheme)
        _attach_methods(model)
        if fast_inference:
            from .inference.vllm_backend import attach_fast_inference
            from .state import get_state

            attach_fast_inference(model, str(get_state(model).source.path), plan.max_seq_length,
                                  gpu_memory_utilization=gpu_memory_utilization, max_lora_rank=max_lora_rank,
                                  float8_kv_cache=float8_kv_cache, disable_log_stats=disable_log_stats,
                                  seed=random_state or 0)
        return model, tokenizer

    @staticmethod
    @functools.wraps(lora.get_peft_model)
    def get_peft_model(model, *args, **kwargs):
        model = lora.get_peft_model(model, *args, **kwargs)
        _attach_methods(model)
        return model

    for_training = staticmethod(modes.for_training)
    for_inference = staticmethod(modes.for_inference)


class FastModel(FastLanguageModel):
    """The generic path: any architecture `auto_model` (default `AutoModelForCausalLM`) can build, with or without
    a fastlm ArchSpec; families without one train through the plain transformers forward."""
