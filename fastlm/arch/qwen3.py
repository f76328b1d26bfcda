"""Qwen3: Llama layout plus RMSNorm on queries and keys per head (q_norm, k_norm)."""
from .spec import ArchSpec

SPEC = ArchSpec(family="qwen3", model_types=("qwen3",), qk_norm=True,
                         sliding_window_attr="sliding_window")
