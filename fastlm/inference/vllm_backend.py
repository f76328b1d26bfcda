"""`fast_inference=True`: vLLM serves `fast_generate` when it is importable (and a GPU is there); otherwise the
built-in engine does, with one notice.

vLLM loads the model directory itself (its own copy of the weights on the GPU; fastlm does not share them), with
LoRA enabled so adapters go through its `LoRARequest`. fastlm's `SamplingParams` and `LoRARequest` are converted
field by field (they carry vLLM's names); vLLM's own objects pass through unchanged, and vLLM's RequestOutput
objects are returned as they are (fastlm's built-in outputs have the same shape).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging

from ..state import base_model_of

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def vllm_available() -> bool:
    """True when `import vllm` can work (checked once, without importing it)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    def __deepcopy__(self, memo):
        """A deep copy of the model gets no vLLM engine (one process-wide GPU engine cannot be copied, and sharing it
        would serve the original's weights): fast_generate on the copy runs fastlm's built-in engine on the copy."""
        return None

    def __init__(self, model_dir: str, max_seq_length: int, dtype: str = "auto", gpu_memory_utilization: float = 0.5,
                 max_lora_rank: int = 64, float8_kv_cache: bool = False, disable_log_stats: bool = True,
                 quantization: str | None = None, seed: int = 0):
        from vllm import LLM

        kw = dict(model=str(model_dir), max_model_len=max_seq_length, dtype=dtype,
                  gpu_memory_utilization=gpu_memory_utilization, enable_lora=True, max_lora_rank=max_lora_rank,
                  disable_log_stats=disable_log_stats, seed=seed)
        if float8_kv_cache:
            kw["kv_cache_dtype"] = "fp8"
        if quantization:
            kw["quantization"] = quantization
        self.llm = LLM(**kw)

    def generate(self, prompts, sampling_params=None, lora_request=None):
        return self.llm.generate(prompts, to_vllm_sampling_params(sampling_params),
                                 lora_request=to_vllm_lora_request(lora_request))


def to_vllm_sampling_params(params):
    """fastlm SamplingParams (or a list of them) -> vLLM's; vLLM's own objects and None pass through."""
    from vllm import SamplingParams as VSamplingParams

    from .sampling import SamplingParams

    if isinstance(params, list):
        return [to_vllm_sampling_params(p) for p in params]
    if not isinstance(params, SamplingParams):
        return params
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    return VSamplingParams(**fields)


def to_vllm_lora_request(request):
    if request is None:
        return None
    from vllm.lora.request import LoRARequest as VLoRARequest

    if isinstance(request, VLoRARequest):
        return request
    return VLoRARequest(request.lora_name, request.lora_int_id, request.lora_path)


def attach_fast_inference(model, model_dir: str, max_seq_length: int, **engine_args) -> str:
    """Called by the loader for `fast_inference=True`: "vllm" when vLLM now serves `model.fast_generate`,
    "builtin" (with one notice) when vLLM is missing or there is no GPU."""
    import torch

    if not vllm_available() or not torch.cuda.is_available():
        why = "vLLM is not installed" if not vllm_available() else "vLLM needs a CUDA GPU"
        logger.warning("fastlm: fast_inference=True but %s; the built-in engine serves fast_generate "
                       "(pip install vllm to use vLLM)", why)
        return "builtin"
    base_model_of(model).__dict__["_fastlm_vllm"] = VLLMBackend(model_dir, max_seq_length, **engine_args)
    return "vllm"
