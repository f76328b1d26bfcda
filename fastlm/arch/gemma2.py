"""Gemma 2: Gemma plus attention and final-logit soft-capping, sandwich norms, alternating sliding window."""
from .spec import ArchSpec

SPEC = ArchSpec(
    family="gemma2", model_types=("gemma2",), norm="rms_plus_one", activation="gelu_tanh",
    embedding_scale="sqrt_hidden", final_logit_softcap_attr="final_logit_softcapping",
    attn_logit_softcap_attr="attn_logit_softcapping", sliding_window_attr="sliding_window",
    norm_names=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm"),
)
