"""The one-query decode attention kernel vs its reference, and the reference vs attention written out per key."""
import math

import pytest
import torch
from conftest import DTYPES, TOL, kernel_module

from fastlm.kernels._triton import force_triton


def _case(b, h, kv, d, length, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype)
    k = torch.randn(b + 1, kv, length, d, generator=g).to(dtype)  # one slot more than rows: rows read slots 0..b-1
    v = torch.randn(b + 1, kv, length, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h, kv, d, softcap, window", [
    (8, 2, 64, None, None),     # GQA groups of 4 (Llama)
    (6, 2, 80, None, None),     # groups of 3, head dim not a power of two (Phi-3)
    (4, 4, 32, 50.0, None),     # no grouping, soft-capped scores (Gemma 2)
    (8, 2, 64, None, 7),        # sliding window
])
def test_decode_attention_kernel_matches_reference(dtype, h, kv, d, softcap, window):
    mod = kernel_module("decode_attention")
    q, k, v = _case(3, h, kv, d, 70, dtype)
    positions = torch.tensor([0, 37, 69])  # first position, mid-block, last cache position
    scaling = 1 / math.sqrt(d) * (3.0 if softcap else 1.0)  # large scores so the cap matters
    ref = mod.decode_attention_reference(q, k, v, positions, scaling, softcap, window)
    with force_triton():
        got = mod.decode_attention(q, k, v, positions, scaling, softcap, window)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


def test_reference_equals_attention_written_out_per_key():
    mod = kernel_module("decode_attention")
    q, k, v = _case(2, 4, 2, 16, 20, torch.float64, seed=1)
    positions = torch.tensor([5, 19])
    cap, window, scale = 3.0, 4, 0.5
    got = mod.decode_attention_reference(q, k, v, positions, scale, cap, window)
    for row in range(2):
        p = int(positions[row])
        keys = [j for j in range(p + 1) if j > p - window]
        for head in range(4):
            kvh = head // 2
            s = torch.stack([cap * torch.tanh((q[row, head, 0] @ k[row, kvh, j]) * scale / cap) for j in keys])
            w = torch.softmax(s, 0)
            expected = sum(wj * v[row, kvh, j] for wj, j in zip(w, keys))
            torch.testing.assert_close(got[row, 0, head * 16:(head + 1) * 16], expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_under_torch_compile_is_the_same_launch():
    """The engine compiles its decode step: the kernel goes in as an opaque op and gives the eager launch's output."""
    mod = kernel_module("decode_attention")
    q, k, v = _case(2, 8, 2, 64, 40, torch.float32, seed=3)
    positions = torch.tensor([3, 39])
    with force_triton():
        eager = mod.decode_attention(q, k, v, positions, 0.125, None, 16)
        compiled = torch.compile(lambda *a: mod.decode_attention(*a, 0.125, None, 16), fullgraph=True)(
            q, k, v, positions)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager, mod.decode_attention_reference(q, k, v, positions, 0.125, None, 16),
                               atol=1e-5, rtol=1e-5)
