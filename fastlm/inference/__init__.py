"""Inference: the decode engine, sampling, engine-backed `generate`, `fast_generate`, the vLLM backend, thinking
helpers. Heavy pieces are imported where used."""
from .sampling import SamplingParams

__all__ = ["SamplingParams"]
