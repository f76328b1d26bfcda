"""The split-K NF4 GEMV (pure-Triton twin of the byte-permute asm under the interpreter): its partial sums add up to
the dequantize-then-matmul reference for bitsandbytes-quantized and random bytes, tails in N and K included; its
config is checked; the engine's projection hands the partial sums to the decode epilogues."""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")


def _modules():
    from triton.runtime.interpreter import InterpretedFunction

    from fastlm.kernels import decode_nf4, decode_nf4_prmt, decode_nf4_splitk

    if not torch.cuda.is_available() and not isinstance(decode_nf4_splitk._nf4_partials_kernel,
                                                        InterpretedFunction):
        importlib.reload(decode_nf4_prmt)
        decode_nf4 = importlib.reload(decode_nf4)
        decode_nf4_splitk = importlib.reload(decode_nf4_splitk)
    return decode_nf4, decode_nf4_splitk


def _case(n, k, m, table, dtype, seed=0):
    torch.manual_seed(seed)
    if table == "bnb":
        bnb = pytest.importorskip("bitsandbytes.functional")
        from fastlm.kernels.decode_nf4 import nf4_absmax_fp32

        packed, state = bnb.quantize_4bit(torch.randn(n, k), blocksize=64, compress_statistics=True,
                                          quant_type="nf4")
        absmax, code = nf4_absmax_fp32(state), state.code.float()
    else:
        packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8)
        absmax = torch.rand(n * k // 64) + 0.05
        code = torch.tensor(sorted((torch.randn(16) * 2).tolist()))
    return torch.randn(m, k).to(dtype), packed, absmax, code


@pytest.mark.parametrize("n, k, m, table, dtype, cfg", [
    (17, 512, 1, "bnb", torch.bfloat16, (8, 128, 1)),      # N % BLOCK_N, 4 whole splits
    (12, 320, 2, "sorted", torch.float16, (4, 128, 2)),    # K tail: the third split is half past the row's end
    (5, 192, 1, "sorted", torch.float32, (8, 256, 1)),     # N < BLOCK_N, one split wider than K; fp32 x -> bf16
    (9, 256, 3, "bnb", torch.bfloat16, (2, 64, 1)),        # 3 rows of x, 4 splits
])
def test_partials_add_up_to_the_reference(n, k, m, table, dtype, cfg):
    d, s = _modules()
    x, packed, absmax, code = _case(n, k, m, table, dtype)
    ref = d.nf4_gemv_reference(x.float(), packed, absmax, code, n, k, 64)
    got = s.nf4_partials(x, packed, absmax, code, n, k, 64, cfg)
    assert got.dtype == torch.float32 and got.shape == (-(-k // cfg[1]), m, n)
    # 16-bit table values and products (bf16: 8-bit mantissa, fp16: 11), float32 across words; plus x's rounding
    tol = 1e-3 if dtype == torch.float16 else 6e-3
    assert d.relative_error(got.sum(0), ref) < tol
    # each split is the product over its own columns only
    c1 = min(k, cfg[1])
    part = d.nf4_gemv_reference(x.float()[:, :c1], *_columns(packed, absmax, n, k, c1), code, n, c1, 64)
    assert d.relative_error(got[0], part) < tol


def _columns(packed, absmax, n, k, c1):
    """The packed bytes and scales of columns [0, c1) of every row (c1 a multiple of the blocksize 64)."""
    rows = packed.view(n, k // 2)[:, :c1 // 2].reshape(-1)
    return rows, absmax.view(n, k // 64)[:, :c1 // 64].reshape(-1)


def test_config_is_checked_and_interpreter_config_respects_max_splits():
    _, s = _modules()
    x, packed, absmax, code = _case(8, 128, 1, "sorted", torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_N, BLOCK_K, num_warps"):
        s.nf4_partials(x, packed, absmax, code, 8, 128, 64, (8, 100, 1))
    with pytest.raises(ValueError, match="nf4_partials_config"):
        s.nf4_partials(x, packed, absmax, code, 8, 128, 64, (8, 128))
    assert s.nf4_partials_config(8, 128, 64, packed, code) == s.INTERPRETER_CONFIG
    # 4096 columns in splits of 32 would be 128 partial sums: more than the consumer adds
    assert s.nf4_partials_config(8, 4096, 64, packed, code, max_splits=16) is None
    assert s.nf4_partials_config(8, 128, 64, packed, torch.zeros(8)) is None  # not a 16-entry table
    assert s.nf4_partials_config(8, 128, 64, packed, code, dtype=torch.float32) is None
