"""The split-K decode GEMV with its weight tiles loaded ahead of x (the PDL order): every STEPS value the tuner
tries gives partial sums that add up to x @ W^T, with K tails masked; configs it cannot run are refused by name."""
import pytest
import torch

from conftest import TOL, kernel_module
from fastlm.kernels._triton import force_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg,k", [((16, 32, 2, 1), 150), ((8, 16, 4, 1), 200), ((16, 64, 4, 2), 64)])
def test_every_step_count_sums_to_the_product(dtype, cfg, k):
    mod = kernel_module("decode_gemv")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, k, generator=g).to(dtype)
    w = torch.randn(37, k, generator=g).to(dtype)
    with force_triton():
        parts = mod.gemv_partials(x, w, cfg)
    assert parts.shape == (mod.splits(k, cfg), 2, 37)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(parts.sum(0), (x.double() @ w.double().t()).float(), atol=atol, rtol=rtol)


def test_interpreter_config_keeps_steps_the_kernel_unrolls():
    mod = kernel_module("decode_gemv")
    for k in (64, 1100, 1600, 5000):
        cfg = mod.gemv_config(torch.zeros(8, k))
        assert cfg[2] in (1, 2, 4) and mod.splits(k, cfg) <= mod.MAX_SPLITS, (k, cfg)


@pytest.mark.parametrize("cfg", [(16, 32, 3, 1), (12, 32, 1, 1), (16, 32, 1)])
def test_configs_the_kernel_cannot_run_are_refused(cfg):
    mod = kernel_module("decode_gemv")
    with pytest.raises(ValueError, match="get one from gemv_config"):
        mod.gemv_partials(torch.zeros(1, 64), torch.zeros(16, 64), cfg)
