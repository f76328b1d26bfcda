"""Mistral: Llama layout with an optional sliding attention window."""
from .registry import ArchSpec, register

SPEC = register(ArchSpec(family="mistral", model_types=("mistral",), sliding_window_attr="sliding_window"))
