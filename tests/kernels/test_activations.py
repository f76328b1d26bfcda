"""SwiGLU / GeGLU kernels vs the torch reference and vs transformers' ACT2FN, forward and backward."""
import pytest
import torch
from conftest import DTYPES, assert_close, forward_backward, kernel_module, leaf

from fastlm.errors import ConfigError
from fastlm.kernels._triton import force_triton
from fastlm.kernels.reference import geglu_reference, swiglu_reference

SHAPES = [(3, 37), (1, 1), (2, 5000), (2, 3, 24)]
# (kernel call, transformers activation name)
OPS = [("swiglu", None, "silu"), ("geglu", "none", "gelu"), ("geglu", "tanh", "gelu_pytorch_tanh")]


def _reference(op, approximate, g, u):
    return swiglu_reference(g, u) if op == "swiglu" else geglu_reference(g, u, approximate)


def _call(mod, op, approximate, g, u, **kw):
    return mod.swiglu(g, u, **kw) if op == "swiglu" else mod.geglu(g, u, approximate, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op,approximate,hf_name", OPS)
def test_gated_activation_matches_transformers(op, approximate, hf_name, shape, dtype):
    from transformers.activations import ACT2FN

    mod = kernel_module("activations")
    torch.manual_seed(0)
    g, u, dh = (torch.randn(shape, dtype=dtype) * 3 for _ in range(3))
    with force_triton():
        got = forward_backward(lambda a, b: _call(mod, op, approximate, a, b), (g, u), dh)
    ref = forward_backward(lambda a, b: _reference(op, approximate, a, b), (g, u), dh)
    hf = forward_backward(lambda a, b: ACT2FN[hf_name](a) * b, (g, u), dh)
    for x, r, h in zip(got, ref, hf):
        assert x.dtype == h.dtype and x.shape == h.shape
        assert_close(x, r, dtype, grad=True, scale="max")
        assert_close(x, h, dtype, grad=True, scale="max")


@pytest.mark.parametrize("op,approximate,hf_name", OPS)
def test_inplace_backward_on_fused_gate_up_chunks(op, approximate, hf_name):
    """Phi-3 style: g, u are chunks of one gate_up output (row stride 2*I); the in-place backward writes into them."""
    from transformers.activations import ACT2FN

    mod = kernel_module("activations")
    torch.manual_seed(1)
    x = torch.randn(2, 5, 6)
    w = torch.randn(2 * 24, 6)
    dh = torch.randn(2, 5, 24)
    grads = []
    for fast in (True, False):
        xl = leaf(x)
        g, u = (xl @ w.T).chunk(2, dim=-1)
        with force_triton(fast):
            h = _call(mod, op, approximate, g, u, inplace_backward=True) if fast else ACT2FN[hf_name](g) * u
        h.backward(dh)
        grads.append((h.detach(), xl.grad))
    assert_close(grads[0][0], grads[1][0], torch.float32)
    assert_close(grads[0][1], grads[1][1], torch.float32, grad=True, scale="max")


def test_inplace_backward_fails_loudly_when_another_node_saved_g():
    mod = kernel_module("activations")
    torch.manual_seed(2)
    x = torch.randn(3, 8, requires_grad=True)
    g, u = x * 2.0, x * 3.0
    other = g.sin()  # SinBackward saved g and runs after the in-place backward has overwritten it
    with force_triton():
        h = mod.swiglu(g, u, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (h.sum() + other.sum()).backward()


def test_activation_bad_arguments_name_the_fix():
    mod = kernel_module("activations")
    g = torch.randn(2, 4)
    with pytest.raises(ConfigError, match="approximate='erf'.*'tanh'"):
        mod.geglu(g, g, "erf")
    with pytest.raises(ConfigError, match=r"u=.\(2, 5\).*\(2, 4\)"):
        mod.swiglu(g, torch.randn(2, 5))
