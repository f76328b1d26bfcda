"""Gemma: (1 + w) RMSNorm, tanh-GELU gated MLP, embeddings scaled by sqrt(hidden_size)."""
from .spec import ArchSpec

SPEC = ArchSpec(family="gemma", model_types=("gemma",), norm="rms_plus_one", activation="gelu_tanh",
                         embedding_scale="sqrt_hidden")
