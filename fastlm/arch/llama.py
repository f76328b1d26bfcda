"""Llama (1/2/3.x), SmolLM: RMSNorm, SiLU-gated MLP, rotate-half RoPE."""
from .registry import ArchSpec, register

SPEC = register(ArchSpec(family="llama", model_types=("llama",)))
