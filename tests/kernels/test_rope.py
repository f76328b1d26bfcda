"""RoPE kernel vs the torch reference and vs transformers' apply_rotary_pos_emb, with cos/sin from the models' own
rotary modules for every rope_type, packed position_ids, GQA and Phi-3's partial rotary."""
import pytest
import torch
from conftest import DTYPES, assert_close, forward_backward, kernel_module

from fastlm.errors import ConfigError
from fastlm.kernels._triton import force_triton
from fastlm.kernels.reference import apply_rope_reference

HEAD_DIM = 16
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [2.0 + 0.3 * i for i in range(HEAD_DIM // 2)]},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
}


def _cos_sin(family: str, rope_parameters: dict, position_ids: torch.Tensor, dtype, **extra):
    """cos, sin from the model family's real rotary module (max_position_embeddings 8 so scalings kick in)."""
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    config = config_cls(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=8, rope_parameters=dict(rope_parameters), **extra)
    modeling = __import__(f"transformers.models.{family.lower()}.modeling_{family.lower()}", fromlist=["x"])
    rotary = getattr(modeling, f"{family}RotaryEmbedding")(config)
    cos, sin = rotary(torch.zeros(1, dtype=dtype), position_ids)
    return cos, sin, modeling.apply_rotary_pos_emb


def _check_against(mod, q, k, cos, sin, hf_apply, dtype):
    torch.manual_seed(5)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    with force_triton():
        got = forward_backward(lambda a, b: mod.apply_rope(a, b, cos, sin), (q, k), (dq, dk))
    ref = forward_backward(lambda a, b: apply_rope_reference(a, b, cos, sin), (q, k), (dq, dk))
    hf = forward_backward(lambda a, b: hf_apply(a, b, cos, sin), (q, k), (dq, dk))
    for g, r, h in zip(got, ref, hf):
        assert g.shape == h.shape and g.dtype == h.dtype
        assert_close(g, r, dtype)
        assert_close(g, h, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_rope_matches_transformers_for_each_rope_type(rope_type, dtype):
    mod = kernel_module("rope")
    # two packed sequences per row (positions restart), 12 tokens > max_position_embeddings 8
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(12))])
    cos, sin, hf_apply = _cos_sin("Llama", ROPE_PARAMETERS[rope_type], position_ids, dtype)
    torch.manual_seed(3)
    # q as the attention produces it: (b, s, h, d) projection output viewed as (b, h, s, d)
    q = torch.randn(2, 12, 4, HEAD_DIM, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 2, 12, HEAD_DIM, dtype=dtype)
    _check_against(mod, q, k, cos, sin, hf_apply, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_rotary_phi3_passes_the_rest_through(dtype):
    mod = kernel_module("rope")
    position_ids = torch.arange(7)[None].expand(3, 7)
    cos, sin, hf_apply = _cos_sin("Phi3", {"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5}, position_ids, dtype)
    assert cos.shape[-1] == HEAD_DIM // 2
    torch.manual_seed(4)
    q = torch.randn(3, 4, 7, HEAD_DIM, dtype=dtype)
    k = torch.randn(3, 2, 7, HEAD_DIM, dtype=dtype)
    _check_against(mod, q, k, cos, sin, hf_apply, dtype)


def test_rope_tiny_broadcast_batch_and_bshd_layout():
    mod = kernel_module("rope")
    torch.manual_seed(6)
    angles = torch.rand(1, 1, 1) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # rot 2, head_dim 2
    q, k = torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    _check_against(mod, q, k, cos, sin, apply_rotary_pos_emb, torch.float32)
    # (b, s, h, d) with unsqueeze_dim=2 and cos shared over the batch
    pos = torch.arange(5)[None]
    cos, sin, hf_apply = _cos_sin("Llama", ROPE_PARAMETERS["default"], pos, torch.float32)
    q, k = torch.randn(2, 5, 4, HEAD_DIM), torch.randn(2, 5, 2, HEAD_DIM)
    with force_triton():
        qo, ko = mod.apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    qh, kh = hf_apply(q, k, cos, sin, unsqueeze_dim=2)
    assert_close(qo, qh, torch.float32)
    assert_close(ko, kh, torch.float32)


def test_rope_bad_shapes_name_the_fix():
    mod = kernel_module("rope")
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    with pytest.raises(ConfigError, match="cos.shape"):
        mod.apply_rope(q, k, torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    with pytest.raises(ConfigError, match="unsqueeze_dim=3"):
        mod.apply_rope(q, k, torch.randn(1, 6, 16), torch.randn(1, 6, 16), unsqueeze_dim=3)
