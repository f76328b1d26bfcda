"""Inference: the decode engine, sampling, engine-backed `generate`, `fast_generate`, the vLLM backend, thinking
helpers. Heavy pieces are imported where used."""
from .fast_generate import LoRARequest
from .sampling import SamplingParams

__all__ = ["LoRARequest", "SamplingParams"]
