"""RMSNorm kernel vs the torch reference and vs transformers' LlamaRMSNorm / GemmaRMSNorm, forward and backward."""
import pytest
import torch
from conftest import DTYPES, assert_close, forward_backward, kernel_module, leaf

from fastlm.errors import ConfigError
from fastlm.kernels._triton import force_triton
from fastlm.kernels.reference import rms_norm_reference

SHAPES = [(3, 5, 37), (1, 1, 1), (2, 4100), (2, 3, 4, 16)]  # non-pow2, tiny, long row, q-norm (b, s, h, d)
VARIANTS = [("llama", 0.0), ("gemma", 1.0), ("llama", 1.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cast,offset", VARIANTS)
def test_rms_norm_matches_reference(shape, dtype, cast, offset):
    mod = kernel_module("rms_norm")
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    w = (torch.randn(shape[-1]) * 0.5 + (0 if offset else 1)).to(dtype)
    dy = torch.randn(shape, dtype=dtype)
    with force_triton():
        y, dx, dw = forward_backward(lambda a, b: mod.rms_norm(a, b, 1e-6, offset, cast), (x, w), dy)
    y_ref, dx_ref, dw_ref = forward_backward(lambda a, b: rms_norm_reference(a, b, 1e-6, offset, cast), (x, w), dy)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype, grad=True, scale="max")
    assert_close(dw, dw_ref, dtype, grad=True, scale="max")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_transformers_modules(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    mod = kernel_module("rms_norm")
    torch.manual_seed(1)
    x = torch.randn(2, 7, 48, dtype=dtype)
    dy = torch.randn(2, 7, 48, dtype=dtype)
    for hf_cls, cast, offset in [(LlamaRMSNorm, "llama", 0.0), (GemmaRMSNorm, "gemma", 1.0)]:
        hf = hf_cls(48, eps=1e-5).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(torch.randn(48) * 0.3)
        x_hf = leaf(x)
        y_hf = hf(x_hf)
        y_hf.backward(dy)
        with force_triton():
            y, dx, dw = forward_backward(lambda a, b: mod.rms_norm(a, b, 1e-5, offset, cast),
                                         (x, hf.weight.detach()), dy)
        assert y.dtype == y_hf.dtype
        assert_close(y, y_hf, dtype)
        assert_close(dx, x_hf.grad, dtype, grad=True, scale="max")
        assert_close(dw, hf.weight.grad, dtype, grad=True, scale="max")


def test_frozen_weight_gets_no_grad_and_input_grad_is_right():
    mod = kernel_module("rms_norm")
    torch.manual_seed(2)
    x, w, dy = torch.randn(6, 40), torch.randn(40), torch.randn(6, 40)
    xl = leaf(x)
    with force_triton():
        mod.rms_norm(xl, w, 1e-6).backward(dy)
    xr = leaf(x)
    rms_norm_reference(xr, w, 1e-6).backward(dy)
    assert w.grad is None
    assert_close(xl.grad, xr.grad, torch.float32, grad=True)


def test_rms_norm_bad_arguments_name_the_fix():
    mod = kernel_module("rms_norm")
    x = torch.randn(2, 8)
    with pytest.raises(ConfigError, match="cast='mean'.*'llama'"):
        mod.rms_norm(x, torch.ones(8), 1e-6, cast="mean")
    with pytest.raises(ConfigError, match=r"weight.shape=\(7,\).*\(8,\)"):
        mod.rms_norm(x, torch.ones(7), 1e-6)
