"""Gemma 3 (text): Gemma 2 layout with q/k-norm, per-layer-type RoPE (local/global) and no attention soft-cap."""
from .spec import ArchSpec

SPEC = ArchSpec(
    family="gemma3", model_types=("gemma3_text", "gemma3"), norm="rms_plus_one", activation="gelu_tanh",
    embedding_scale="sqrt_hidden", qk_norm=True, final_logit_softcap_attr="final_logit_softcapping",
    sliding_window_attr="sliding_window",
    text_prefix={"gemma3": "model.language_model"},  # Gemma3ForConditionalGeneration
    norm_names=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm"),
)
