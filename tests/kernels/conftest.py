"""Kernel tests: on a CPU machine the Triton kernels run on CPU tensors through the Triton interpreter; on a CUDA
machine the same tests run compiled kernels on CUDA tensors (plus bf16), so `pytest tests/kernels` on the GPU box
checks the real compiled kernels against transformers.

TRITON_INTERPRET must be set before a kernel module decorates its kernels, so it is set here (pytest imports this
conftest before the test modules of this folder) -- only without CUDA, so GPU tests elsewhere keep compiled
kernels -- and `kernel_module` reloads a module that some earlier import decorated without the interpreter.
"""
import importlib
import os

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

# (atol, rtol) per dtype: fp32 is exact up to summation order; fp16/bf16 outputs are rounded once by the kernel and
# several times by the op-by-op reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])  # interpreter bf16 math is inexact


@pytest.fixture(autouse=True)
def _on_test_device():
    """Tensors and modules the tests create land on DEVICE."""
    with torch.device(DEVICE):
        yield


def _interpreted(name: str) -> tuple[object, bool]:
    """(module, whether it had to be reloaded so that its kernels run under the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    mod = importlib.import_module(f"fastlm.kernels.{name}")
    if CUDA:
        return mod, False
    kernels = [v for k, v in vars(mod).items() if k.startswith("_") and k.endswith("_kernel")]
    assert kernels, f"no kernels found in fastlm.kernels.{name}"
    if all(isinstance(k, InterpretedFunction) for k in kernels):
        return mod, False
    return importlib.reload(mod), True


def kernel_module(name: str, uses: tuple[str, ...] = ()):
    """fastlm.kernels.<name>, with its kernels (or those of the modules it `uses`) running under the interpreter."""
    if not uses:
        return _interpreted(name)[0]
    reloaded = [_interpreted(u)[1] for u in uses]
    mod = importlib.import_module(f"fastlm.kernels.{name}")
    return importlib.reload(mod) if any(reloaded) else mod


def assert_close(actual, expected, dtype, grad=False, scale=None):
    """Compare with the dtype's tolerance; grads compare relative to their largest magnitude when scale='max'."""
    atol, rtol = (GRAD_TOL if grad else TOL)[dtype]
    if scale == "max":
        atol = atol * max(1.0, expected.detach().float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def forward_backward(fn, inputs, grad_outputs):
    """Run fn on fresh leaf copies of inputs, backprop grad_outputs; returns (*outputs, *input grads)."""
    leaves = [leaf(t) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_outputs if isinstance(grad_outputs, tuple) else (grad_outputs,))
    return (*outs, *(x.grad for x in leaves))
