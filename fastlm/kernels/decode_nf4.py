"""NF4 dequant-GEMV for small-batch decode: y = x @ W^T with W read as 4-bit (bitsandbytes NF4 layout).

Layout (bitsandbytes `quantize_4bit`, quant_type="nf4"): W [N, K] flattened row-major, two 4-bit codes per byte
(the first element in the high nibble), one absmax scale per `blocksize` consecutive elements; with double
quantization the absmax values are themselves 8-bit, so `nf4_absmax_fp32` dequantizes them once (engine build).
Decode reads 0.5 byte per weight instead of 2, which is where batch-1 4-bit speed comes from.

`nf4_gemv(x, packed, absmax, code, n, k, blocksize)`: x [M, K] (M small, e.g. <= 4) -> [M, N] in x.dtype.
`nf4_gemv_reference`: the same in pure torch (dequantize, then matmul), for tests and CPU.
"""
from __future__ import annotations

import sys

import torch

from ._triton import graph_replay_ms, interpreter_on, register_opaque_op

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


def nf4_pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256] int64: for each packed byte, the float32 bits of its high-nibble value in the low word and of its
    low-nibble value in the high word, so the pair-table kernels decode two weights with one table load."""
    c = code.float().cpu()
    bits = c.view(torch.int32).long() & 0xFFFFFFFF
    b = torch.arange(256)
    return (bits[b >> 4] | (bits[b & 15] << 32)).to(code.device)


if triton is not None:
    @triton.jit
    def _pair_products(q_ptr, lut_ptr, x_ptr, row_bytes, kb, row_ok, m, K):
        """[rows, bytes]: w_hi * x[2 kb] + w_lo * x[2 kb + 1], both weights of each byte from one table load."""
        byte = tl.load(q_ptr + row_bytes + kb[None, :], mask=row_ok[:, None], other=0)
        pair = tl.load(lut_ptr + byte.to(tl.int32))
        w_hi = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        w_lo = ((pair >> 32) & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        x_even = tl.load(x_ptr + m * K + 2 * kb).to(tl.float32)
        x_odd = tl.load(x_ptr + m * K + 2 * kb + 1).to(tl.float32)
        return w_hi * x_even[None, :] + w_lo * x_odd[None, :]

    @triton.jit
    def _nf4_gemv_v2_kernel(x_ptr, q_ptr, absmax_ptr, lut_ptr, y_ptr, N, K, BLOCKSIZE: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # BLOCK_K elements per step (a multiple of BLOCKSIZE; K a multiple of BLOCK_K): one table load per byte,
        # one scale per BLOCKSIZE elements applied after the partial sums
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        half_k = K // 2
        HB: tl.constexpr = BLOCK_K // 2
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE
        blocks_per_row = K // BLOCKSIZE
        row_bytes = rows[:, None].to(tl.int64) * half_k
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // 2 + tl.arange(0, HB)
            part = _pair_products(q_ptr, lut_ptr, x_ptr, row_bytes, kb, row_ok, m, K)
            part = tl.sum(tl.reshape(part, [BLOCK_N, NB, BLOCKSIZE // 2]), axis=2)
            blk = rows[:, None].to(tl.int64) * blocks_per_row + k0 // BLOCKSIZE + tl.arange(0, NB)[None, :]
            scale = tl.load(absmax_ptr + blk, mask=row_ok[:, None], other=0.0)
            acc += tl.sum(part * scale, axis=1)
        tl.store(y_ptr + m * N + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


    @triton.jit
    def _nf4_gemv_v3_kernel(x_ptr, q_ptr, absmax_ptr, lut_ptr, y_ptr, N, K, BLOCKSIZE: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        # one quantization block per row and step: the scale multiplies the row's partial sum, no reshapes
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        half_k = K // 2
        HB: tl.constexpr = BLOCKSIZE // 2
        blocks_per_row = K // BLOCKSIZE
        row_bytes = rows[:, None].to(tl.int64) * half_k
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for blk in range(0, blocks_per_row):
            kb = blk * HB + tl.arange(0, HB)
            part = tl.sum(_pair_products(q_ptr, lut_ptr, x_ptr, row_bytes, kb, row_ok, m, K), axis=1)
            scale = tl.load(absmax_ptr + rows.to(tl.int64) * blocks_per_row + blk, mask=row_ok, other=0.0)
            acc += part * scale
        tl.store(y_ptr + m * N + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


# (BLOCK_N, BLOCK_K, num_warps) tried per (N, K) on first use; each of the first seven won at least one decode shape
# of Llama-3.2-1B / Llama-3.1-8B on an H100 (scripts/gpu_engine_profile.py's sweep)
_V2_CONFIGS = [(1, 1024, 1), (1, 1024, 2), (4, 512, 2), (4, 1024, 1), (8, 256, 1), (8, 512, 2), (16, 256, 1),
               # larger tiles, more bytes in flight per program (not measured yet; the timing below decides)
               (8, 1024, 4), (16, 512, 4), (16, 1024, 8),
               # BLOCK_K 0: the one-block-per-step kernel (not measured yet)
               (8, 0, 1), (16, 0, 1), (16, 0, 2), (32, 0, 2), (32, 0, 4), (64, 0, 4)]
_TUNED: dict[tuple, tuple[int, int, int]] = {}


def _launch_v2(x, packed, absmax, lut, y, n, k, blocksize, cfg):
    bn, bk, warps = cfg
    if bk == 0:
        _nf4_gemv_v3_kernel[(triton.cdiv(n, bn), x.shape[0])](x, packed.reshape(-1), absmax, lut, y, n, k,
                                                              BLOCKSIZE=blocksize, BLOCK_N=bn, num_warps=warps)
        return
    _nf4_gemv_v2_kernel[(triton.cdiv(n, bn), x.shape[0])](x, packed.reshape(-1), absmax, lut, y, n, k,
                                                          BLOCKSIZE=blocksize, BLOCK_N=bn, BLOCK_K=bk,
                                                          num_warps=warps)


def nf4_gemv_config(n: int, k: int, blocksize: int, device, rows: int = 1) -> tuple[int, int, int]:
    """The fastest (BLOCK_N, BLOCK_K, num_warps) of the pair-table kernel for this shape, timed once on the device
    (a few ms) and remembered; a fixed config under the interpreter. Call it outside torch.compile."""
    if interpreter_on() or torch.device(device).type != "cuda":
        return (4, 256, 1) if k % 256 == 0 else (16, 0, 1)
    key = (n, k, blocksize, rows, str(device))
    if key in _TUNED:
        return _TUNED[key]
    cands = [c for c in _V2_CONFIGS if c[1] == 0 or (k % c[1] == 0 and c[1] % blocksize == 0)]
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(n * k // blocksize, device=device)
    lut = nf4_pair_table(torch.linspace(-1, 1, 16, device=device))
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    y = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
    best = None
    for cfg in cands:  # timed as 20 launches in a CUDA graph: kernel time, not launch overhead
        try:
            for _ in range(2):
                _launch_v2(x, packed, absmax, lut, y, n, k, blocksize, cfg)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    _launch_v2(x, packed, absmax, lut, y, n, k, blocksize, cfg)
            ms = graph_replay_ms(graph, 3)
        except Exception:  # noqa: BLE001 - a config this device cannot run is skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    _TUNED[key] = best[1] if best else (4, 256, 1)
    return _TUNED[key]


def nf4_gemv(x, packed, absmax, code, n: int, k: int, blocksize: int, lut: torch.Tensor | None = None,
             config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] (x.dtype), reading the weight as 4-bit. Needs triton (CUDA, or CPU under
    TRITON_INTERPRET=1); see nf4_gemv_reference for the math. K a multiple of 256 (every real model) runs the
    pair-table kernel with `lut` = `nf4_pair_table(code)` and `config` = `nf4_gemv_config(...)` (both made once
    by callers that decode many tokens; made here otherwise); other K the simple kernel."""
    if triton is None:
        return nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize)
    if k % 2 or blocksize % 2:
        raise ValueError(f"nf4_gemv needs an even K and blocksize, got K={k}, blocksize={blocksize}")
    x = x.contiguous()
    m = x.shape[0]
    tiled = k % 256 == 0 and 256 % blocksize == 0  # any config; else only the one-block-per-step kernel
    if tiled or (k % blocksize == 0 and blocksize % 32 == 0):
        lut = nf4_pair_table(code) if lut is None else lut
        if tiled:
            config = config or nf4_gemv_config(n, k, blocksize, x.device, m)
        elif not (config and config[1] == 0):
            config = (16, 0, 1)
        # an opaque op for torch.compile: the engine's compiled step makes the launch eager mode makes
        return torch.ops.fastlm.nf4_gemv(x, packed.reshape(-1), absmax, lut, n, k, blocksize, *config)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _nf4_gemv_kernel[(triton.cdiv(n, 16), m)](x, packed.reshape(-1), absmax, code, y, n, k, BLOCKSIZE=blocksize,
                                              BLOCK_N=16, BLOCK_K=256)
    return y


def _op_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, n: int, k: int,
             blocksize: int, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    sys.modules[__name__]._launch_v2(x.contiguous(), packed, absmax, lut, y, n, k, blocksize,
                                     (block_n, block_k, warps))
    return y


def _op_fake(x, packed, absmax, lut, n, k, blocksize, block_n, block_k, warps):
    return x.new_empty(x.shape[0], n)


if triton is not None:
    register_opaque_op("nf4_gemv", _op_impl, _op_fake)
