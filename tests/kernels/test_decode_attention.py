"""The one-query decode attention kernel vs its reference, and the reference vs attention written out per key."""
import math

import pytest
import torch
from conftest import DEVICE, DTYPES, TOL, kernel_module

from fastlm.kernels._triton import force_triton


def _case(b, h, kv, d, length, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU (same numbers on a GPU machine), then moved

    def draw(*shape):
        return torch.randn(*shape, generator=g, device="cpu").to(DEVICE, dtype)

    # one cache slot more than rows: rows read slots 0..b-1
    return draw(b, h, 1, d), draw(b + 1, kv, length, d), draw(b + 1, kv, length, d)


# The cache holds L = 70 keys: split_plan gives chunks of 32 keys (3 splits, the last one 6 keys long). The rows sit
# at the first position, the last key of chunk 0, the first key of chunk 1, mid-chunk and the last cache position.
LENGTH = 70
POSITIONS = [0, 31, 32, 45, 69]


def _check(mod, dtype, h, kv, d, softcap, window, length=LENGTH, positions=POSITIONS, **launch):
    q, k, v = _case(len(positions), h, kv, d, length, dtype)
    positions = torch.tensor(positions)
    scaling = 1 / math.sqrt(d) * (3.0 if softcap else 1.0)  # large scores so the cap matters
    ref = mod.decode_attention_reference(q, k, v, positions, scaling, softcap, window)
    with force_triton():
        if launch:
            got = mod._launch(q, k, v, positions, scaling, softcap, window, **launch)
        else:
            got = mod.decode_attention(q, k, v, positions, scaling, softcap, window)
    atol, rtol = TOL[dtype]
    assert got.shape == ref.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h, kv, d, softcap, window", [
    (8, 2, 64, None, None),     # GQA groups of 4 (Llama)
    (6, 2, 80, None, None),     # groups of 3, head dim not a power of two (Phi-3)
    (4, 4, 64, 50.0, None),     # no grouping, soft-capped scores (Gemma 2)
    (8, 2, 64, None, 7),        # sliding window shorter than a chunk
    (6, 3, 96, 30.0, 40),       # window over two chunks, with a cap; groups of 2, head dim 96
])
def test_decode_attention_kernel_matches_reference(dtype, h, kv, d, softcap, window):
    _check(kernel_module("decode_attention"), dtype, h, kv, d, softcap, window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h, kv, d, softcap, window", [
    (8, 2, 64, None, None),     # groups of 4, padded to the 16 rows of the smallest dot
    (6, 2, 80, 30.0, 40),       # groups of 3, head dim 80, cap, window over two chunks
    (4, 4, 64, None, 7),        # no grouping, window shorter than a chunk
])
def test_tensor_core_path_matches_reference(dtype, h, kv, d, softcap, window):
    _check(kernel_module("decode_attention"), dtype, h, kv, d, softcap, window, use_dot=True)


@pytest.mark.parametrize("chunk, use_dot", [(16, False), (48, False), (64, False), (16, True), (80, True)])
def test_chunks_walked_in_several_steps_or_split_finer(chunk, use_dot):
    """Chunks other than the plan's: 16 keys (5 splits), 48 (a 32-key step then a masked one), 64 (two steps),
    80 (tensor cores: two 32-key steps and a masked one)."""
    _check(kernel_module("decode_attention"), torch.float32, 8, 2, 64, None, 40, chunk=chunk, use_dot=use_dot)


def test_capped_split_count_grows_the_chunk(monkeypatch):
    """Past MAX_SPLITS the chunk grows (70 keys, at most 2 splits: chunks of 64 walked in two 32-key steps)."""
    mod = kernel_module("decode_attention")
    monkeypatch.setattr(mod, "MAX_SPLITS", 2)
    assert mod.split_plan(LENGTH, None, 32) == (64, 2, 32)
    _check(mod, torch.float16, 8, 2, 64, None, None)


def test_split_plan_covers_every_allowed_range():
    mod = kernel_module("decode_attention")
    # the documented choices
    assert mod.split_plan(385, None, 32) == (32, 13, 32)
    assert mod.split_plan(4096, None, 32) == (64, 64, 32)
    assert mod.split_plan(32768, None, 16) == (256, 128, 16)
    assert mod.split_plan(32768, 4096, 16) == (64, 64, 16)
    assert mod.split_plan(1, None, 64) == (32, 1, 32)
    for length in range(1, 9000, 97):
        for window in (None, 5, 1000):
            chunk, splits, block_l = mod.split_plan(length, window, 16)
            span = min(length, window or length)
            assert splits <= mod.MAX_SPLITS and chunk % block_l == 0
            assert (splits - 1) * chunk < span <= splits * chunk  # every key covered, no split always empty


def test_batch_of_64_rows_at_different_positions():
    positions = [(7 * i) % 40 for i in range(64)]
    _check(kernel_module("decode_attention"), torch.float32, 2, 1, 16, None, None, length=40, positions=positions)


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


def test_gpus_without_bf16_tensor_cores_take_the_products_form(monkeypatch):
    """The tensor-core form needs compute capability 8.0 (bf16 MMA); a T4-class GPU gets the products form."""
    from fastlm.kernels import decode_attention as da

    q = torch.zeros(1)
    assert da._dot_ok(q)  # CPU: the interpreter runs both forms
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert da._dot_ok(q) is expected
