"""NF4 dequant-GEMV for small-batch decode: y = x @ W^T with W read as 4-bit (bitsandbytes NF4 layout).

Layout (bitsandbytes `quantize_4bit`, quant_type="nf4"): W [N, K] flattened row-major, two 4-bit codes per byte
(the first element in the high nibble), one absmax scale per `blocksize` consecutive elements; with double
quantization the absmax values are themselves 8-bit, so `nf4_absmax_fp32` dequantizes them once (engine build).
Decode reads 0.5 byte per weight instead of 2, which is where batch-1 4-bit speed comes from.

`nf4_gemv(x, packed, absmax, code, n, k, blocksize)`: x [M, K] (M small, e.g. <= 4) -> [M, N] in x.dtype.
`nf4_gemv_reference`: the same in pure torch (dequantize, then matmul), for tests and CPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the reference serves
    triton = None


def nf4_absmax_fp32(quant_state) -> torch.Tensor:
    """Per-block absmax as float32, undoing bitsandbytes' double quantization when present."""
    absmax = quant_state.absmax
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:absmax.numel()]
        absmax = s2.code.float()[absmax.long()] * scale + quant_state.offset
    return absmax.float().contiguous()


def nf4_dequantize_reference(packed, absmax, code, n: int, k: int, blocksize: int) -> torch.Tensor:
    """[N, K] float32 weights from the packed bytes."""
    b = packed.reshape(-1)
    idx = torch.stack(((b >> 4).long(), (b & 15).long()), dim=1).reshape(-1)[:n * k]
    scale = absmax.float().repeat_interleave(blocksize)[:n * k]
    return (code.float()[idx] * scale).reshape(n, k)


def nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize) -> torch.Tensor:
    w = nf4_dequantize_reference(packed, absmax, code, n, k, blocksize)
    return (x.float() @ w.t()).to(x.dtype)


if triton is not None:
    @triton.jit
    def _nf4_gemv_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, y_ptr, N, K, BLOCKSIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        half_k = K // 2
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, half_k, BLOCK_K // 2):
            kb = k0 + tl.arange(0, BLOCK_K // 2)  # byte index within the row: elements 2*kb and 2*kb + 1
            kb_ok = kb < half_k
            mask = row_ok[:, None] & kb_ok[None, :]
            byte = tl.load(q_ptr + rows[:, None].to(tl.int64) * half_k + kb[None, :], mask=mask, other=0)
            byte = byte.to(tl.int32)
            w_hi = tl.load(code_ptr + (byte >> 4))
            w_lo = tl.load(code_ptr + (byte & 15))
            blk = (rows[:, None].to(tl.int64) * K + 2 * kb[None, :]) // BLOCKSIZE
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
            x_even = tl.load(x_ptr + m * K + 2 * kb, mask=kb_ok, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + m * K + 2 * kb + 1, mask=kb_ok, other=0.0).to(tl.float32)
            acc += tl.sum((w_hi * x_even[None, :] + w_lo * x_odd[None, :]) * scale, axis=1)
        tl.store(y_ptr + m * N + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def nf4_gemv(x, packed, absmax, code, n: int, k: int, blocksize: int, block_n: int = 16,
             block_k: int = 256) -> torch.Tensor:
    """x [M, K] -> [M, N] (x.dtype), reading the weight as 4-bit. Needs triton (CUDA, or CPU under
    TRITON_INTERPRET=1); see nf4_gemv_reference for the math."""
    if triton is None:
        return nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize)
    if k % 2 or blocksize % 2:
        raise ValueError(f"nf4_gemv needs an even K and blocksize, got K={k}, blocksize={blocksize}")
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), m)
    _nf4_gemv_kernel[grid](x, packed.reshape(-1), absmax, code, y, n, k, BLOCKSIZE=blocksize,
                           BLOCK_N=block_n, BLOCK_K=block_k)
    return y
