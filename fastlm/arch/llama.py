"""Llama (1/2/3.x), SmolLM: RMSNorm, SiLU-gated MLP, rotate-half RoPE."""
from .spec import ArchSpec

SPEC = ArchSpec(family="llama", model_types=("llama",))
