"""Qwen2 / Qwen2.5: Llama layout with q/k/v biases and an optional sliding window."""
from .spec import ArchSpec

SPEC = ArchSpec(family="qwen2", model_types=("qwen2",), sliding_window_attr="sliding_window")
