"""Phi-3: fused qkv_proj and gate_up_proj, partial rotary factor, optional sliding window."""
from .spec import ArchSpec

SPEC = ArchSpec(
    family="phi3", model_types=("phi3",), rope="partial", sliding_window_attr="sliding_window",
    fused_linear_aliases={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
)
