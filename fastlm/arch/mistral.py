"""Mistral: Llama layout with an optional sliding attention window."""
from .spec import ArchSpec

SPEC = ArchSpec(family="mistral", model_types=("mistral",), sliding_window_attr="sliding_window")
