"""Per-instance fastlm state kept on the model (`model._fastlm_state`), readable through PEFT wrappers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class FastLMState:
    max_seq_length: int
    tokenizer: Any = None
    spec: Any = None  # ArchSpec or None for families without a spec
    quantization: str | None = None
    full_finetuning: bool = False
    use_gradient_checkpointing: bool | str = "unsloth"
    float32_mixed_precision: bool | None = None
    source: Any = None  # loading.source.ModelSource of the base model
    adapter_source: Any = None  # ModelSource of the adapter directory, when one was loaded


def base_model_of(model):
    """The transformers model under PEFT wrappers."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_state(model) -> FastLMState | None:
    return getattr(base_model_of(model), "_fastlm_state", None)


def set_state(model, state: FastLMState) -> None:
    base = base_model_of(model)
    base._fastlm_state = state
    base.max_seq_length = state.max_seq_length
