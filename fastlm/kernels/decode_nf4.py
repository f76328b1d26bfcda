"""NF4 dequant-GEMV for small-batch decode: y = x @ W^T with W read as 4-bit (bitsandbytes NF4 layout).

Layout (bitsandbytes `quantize_4bit`, quant_type="nf4"): W [N, K] flattened row-major, two 4-bit codes per byte
(the first element in the high nibble), one absmax scale per `blocksize` consecutive elements; with double
quantization the absmax values are themselves 8-bit, so `nf4_absmax_fp32` dequantizes them once (engine build).
Decode reads 0.5 byte per weight instead of 2, which is where batch-1 4-bit speed comes from.

`nf4_gemv(x, packed, absmax, code, n, k, blocksize)`: x [M, K] (M small, e.g. <= 4) -> [M, N] in x.dtype, by the
fastest of three kernels for the shape (timed once on the device): the int32-word kernel with the 16-entry table,
and two with a 256-entry pair table.
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


if triton is not None:
    @triton.jit
    def _nf4_gemv_word_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, y_ptr, N, K, BLOCKSIZE: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        # the packed bytes read as int32 words (8 weights each, wide loads); each 4-bit code is looked up in the
        # 16-entry float32 table: 64 bytes, so every lookup of a warp hits distinct L1 banks or broadcasts (the
        # 256-entry pair table conflicts). One scale per word, gathered (a word never straddles a block).
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        words_per_row = K // 8
        WPB: tl.constexpr = BLOCKSIZE // 8
        row_words = rows[:, None].to(tl.int64) * words_per_row
        # weight j of a word is nibble j ^ 1: bitsandbytes puts a byte's first weight in its high nibble, and the
        # bytes of a word are little-endian
        shift = 4 * (tl.arange(0, 8) ^ 1)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for w0 in range(0, words_per_row, BLOCK_W):
            wi = w0 + tl.arange(0, BLOCK_W)
            w_ok = wi < words_per_row
            mask = row_ok[:, None] & w_ok[None, :]
            word = tl.load(w_ptr + row_words + wi[None, :], mask=mask, other=0)
            val = tl.load(code_ptr + ((word[:, :, None] >> shift[None, None, :]) & 15))
            xv = tl.load(x_ptr + m * K + wi[:, None] * 8 + tl.arange(0, 8)[None, :], mask=w_ok[:, None],
                         other=0.0).to(tl.float32)
            part = tl.sum(val * xv[None, :, :], axis=2)  # [BLOCK_N, BLOCK_W]
            scale = tl.load(absmax_ptr + (row_words + wi[None, :]) // WPB, mask=mask, other=0.0)
            acc += tl.sum(part * scale, axis=1)
        tl.store(y_ptr + m * N + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


# (kernel, BLOCK_N, BLOCK_K, num_warps) tried per (N, K) on first use. Kernels: "pair" (pair table, BLOCK_K weights
# a step), "block" (pair table, one quantization block a step; BLOCK_K unused), "word" (int32 words and the 16-entry
# table, BLOCK_K weights a step). Each "pair"/"block" config won at least one Llama-3.2-1B / Llama-3.1-8B decode shape
# on an H100 (scripts/gpu_engine_profile.py's sweep); the "word" configs are new.
_CONFIGS = [("pair", 1, 1024, 1), ("pair", 1, 1024, 2), ("pair", 4, 512, 2), ("pair", 4, 1024, 1),
            ("pair", 8, 256, 1), ("pair", 8, 512, 2), ("pair", 16, 256, 1),
            ("block", 16, 0, 1), ("block", 32, 0, 2),
            ("word", 1, 1024, 1), ("word", 1, 2048, 2), ("word", 1, 2048, 4), ("word", 2, 1024, 2),
            ("word", 2, 2048, 4), ("word", 4, 512, 2), ("word", 4, 1024, 4), ("word", 8, 256, 2),
            ("word", 8, 512, 4), ("word", 16, 256, 4)]
_TUNED: dict[tuple, tuple] = {}


def _fits(cfg, k: int, blocksize: int) -> bool:
    kind, _, bk, _ = cfg
    if kind == "block":
        return k % blocksize == 0 and blocksize % 32 == 0
    if kind == "word":  # masked tail: any K of whole words
        return k % 8 == 0 and blocksize % 8 == 0
    return k % bk == 0 and bk % blocksize == 0


def _launch(x, packed, absmax, lut, code, y, n, k, blocksize, cfg):
    kind, bn, bk, warps = cfg
    grid = (triton.cdiv(n, bn), x.shape[0])
    if kind == "word":
        _nf4_gemv_word_kernel[grid](x, packed.view(torch.int32), absmax, code, y, n, k, BLOCKSIZE=blocksize,
                                    BLOCK_N=bn, BLOCK_W=bk // 8, num_warps=warps)
    elif kind == "block":
        _nf4_gemv_v3_kernel[grid](x, packed, absmax, lut, y, n, k, BLOCKSIZE=blocksize, BLOCK_N=bn,
                                  num_warps=warps)
    else:
        _nf4_gemv_v2_kernel[grid](x, packed, absmax, lut, y, n, k, BLOCKSIZE=blocksize, BLOCK_N=bn, BLOCK_K=bk,
                                  num_warps=warps)


def _candidates(k: int, blocksize: int, packed: torch.Tensor | None = None) -> list[tuple]:
    words_ok = packed is None or packed.data_ptr() % 16 == 0  # int32 view of the bytes, 16-byte loads
    return [c for c in _CONFIGS if _fits(c, k, blocksize) and (c[0] != "word" or words_ok)]


def nf4_gemv_config(n: int, k: int, blocksize: int, device, rows: int = 1,
                    packed: torch.Tensor | None = None) -> tuple | None:
    """The fastest (kernel, BLOCK_N, BLOCK_K, num_warps) for this shape (and these packed bytes' alignment), timed
    once on the device (a few ms per config) and remembered; a fixed config under the interpreter; None when no
    config fits this K. Call it outside torch.compile."""
    cands = _candidates(k, blocksize, packed)
    if not cands:
        return None
    if interpreter_on() or torch.device(device).type != "cuda":
        words = [c for c in cands if c[0] == "word"]
        return (words or cands)[0]
    key = (n, k, blocksize, rows, str(device), cands[0])
    if key in _TUNED:
        return _TUNED[key]
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(n * k // blocksize, device=device)
    code = torch.linspace(-1, 1, 16, device=device)
    lut = nf4_pair_table(code)
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    y = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
    best = None
    for cfg in cands:  # timed as 20 launches in a CUDA graph: kernel time, not launch overhead
        try:
            for _ in range(2):
                _launch(x, packed, absmax, lut, code, y, n, k, blocksize, cfg)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    _launch(x, packed, absmax, lut, code, y, n, k, blocksize, cfg)
            ms = graph_replay_ms(graph, 3)
        except Exception:  # noqa: BLE001 - a config this device cannot run is skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    _TUNED[key] = best[1] if best else cands[0]
    return _TUNED[key]


def nf4_gemv(x, packed, absmax, code, n: int, k: int, blocksize: int, lut: torch.Tensor | None = None,
             config: tuple | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] (x.dtype), reading the weight as 4-bit. Needs triton (CUDA, or CPU under
    TRITON_INTERPRET=1); see nf4_gemv_reference for the math. Shapes with a fitting config (K and blocksize
    multiples of 8: every real model's) run the tuned kernels, `config` = `nf4_gemv_config(...)` and `lut` =
    `nf4_pair_table(code)` (both made once by callers that decode many tokens; made here otherwise); other shapes
    dequantize and multiply."""
    if triton is None:
        return nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize)
    if k % 2 or blocksize % 2:
        raise ValueError(f"nf4_gemv needs an even K and blocksize, got K={k}, blocksize={blocksize}")
    x = x.contiguous()
    m = x.shape[0]
    packed = packed.reshape(-1)
    if config is None:
        config = nf4_gemv_config(n, k, blocksize, x.device, m, packed)
    elif not _fits(config, k, blocksize):
        raise ValueError(f"nf4_gemv config {config} does not fit K={k}, blocksize={blocksize}")
    if config is None:
        return nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize)
    lut = nf4_pair_table(code) if lut is None else lut
    # an opaque op for torch.compile: the engine's compiled step makes the launch eager mode makes
    return torch.ops.fastlm.nf4_gemv(x, packed, absmax, lut, code.float(), n, k, blocksize,
                                     _KINDS.index(config[0]), *config[1:])


_KINDS = ("pair", "block", "word")


def _op_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, code: torch.Tensor,
             n: int, k: int, blocksize: int, kind: int, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    sys.modules[__name__]._launch(x.contiguous(), packed, absmax, lut, code, y, n, k, blocksize,
                                  (_KINDS[kind], block_n, block_k, warps))
    return y


def _op_fake(x, packed, absmax, lut, code, n, k, blocksize, kind, block_n, block_k, warps):
    return x.new_empty(x.shape[0], n)


if triton is not None:
    register_opaque_op("nf4_gemv", _op_impl, _op_fake)
