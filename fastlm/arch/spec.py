"""`ArchSpec`: what fastlm knows about one model family, as data. One small spec file per family builds one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

NormKind = Literal["rms", "rms_plus_one"]  # rms_plus_one: weight stored as w, applied as (1 + w) (Gemma)
Activation = Literal["silu", "gelu_tanh"]

STANDARD_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """What fastlm knows about one model family.

    Module names are relative to a decoder layer. `fused_linear_aliases` maps a standard
    LoRA target name (q_proj, gate_proj, ...) to the family's fused module when the family fuses them (Phi-3:
    q/k/v -> qkv_proj, gate/up -> gate_up_proj), so users can keep Unsloth's usual `target_modules` list.
    """

    family: str
    model_types: tuple[str, ...]
    norm: NormKind = "rms"
    activation: Activation = "silu"
    rope: Literal["default", "partial"] = "default"
    qk_norm: bool = False
    final_logit_softcap_attr: str | None = None  # config attribute holding the final logit soft-cap
    attn_logit_softcap_attr: str | None = None
    sliding_window_attr: str | None = None
    embedding_scale: Literal["none", "sqrt_hidden"] = "none"
    # where the text decoder lives, by the top-level config's model_type (default "model": model.layers, ...)
    text_prefix: Mapping[str, str] = field(default_factory=dict)
    attention_path: str = "self_attn"
    mlp_path: str = "mlp"
    norm_names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    fused_linear_aliases: Mapping[str, str] = field(default_factory=dict)

    def linear_names(self) -> tuple[str, ...]:
        """The family's own names for the seven transformer linear layers (fused ones once each)."""
        seen: list[str] = []
        for name in STANDARD_LINEAR_NAMES:
            own = self.fused_linear_aliases.get(name, name)
            if own not in seen:
                seen.append(own)
        return tuple(seen)

    def translate_target(self, name: str) -> str:
        """Map a standard LoRA target name to the family's module name."""
        return self.fused_linear_aliases.get(name, name)

    def resolve(self, config):
        """The concrete `ArchConfig` (plain numbers and paths) of one model of this family."""
        from .config import resolve

        return resolve(self, config)
