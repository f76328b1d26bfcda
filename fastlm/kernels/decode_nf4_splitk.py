"""Split-K NF4 GEMV for batch-1 decode: x @ W^T with W read as 4-bit, as fp32 partial sums that the next kernel adds.

    nf4_partials(x [M, K], packed, absmax, code, n, k, blocksize, config) -> [S, M, N] float32

The looping NF4 kernels (decode_nf4.py, decode_nf4_prmt.py) give each program a block of weight rows and walk K in
steps, at most two steps' words in flight; at the Llama-3.2-1B shapes that is one or two programs per SM with 4-8 KB
of loads outstanding, and they reached 1.1-1.6 TB/s. Here, as in the bf16 split-K GEMV (decode_gemv.py), a program
reads one [BLOCK_N rows, BLOCK_K columns] tile of packed words in a single pass (every load issued before the first
decode; with programmatic dependent launch before the previous kernel has finished), decodes it with the byte-permute
asm of decode_nf4_prmt.py (the word's x pairs and its absmax scale read by the asm) and writes one fp32 partial sum
per row: the grid is N/BLOCK_N x K/BLOCK_K x M, and the decode epilogue that consumes the output adds the S partial
sums (kernels/decode_epilogue.py reads every input y as [S, M, N]).

`nf4_partials_config` times the configs once per shape on the device (each one's output checked against the
float32 reference first) against the looping kernel's time and returns the fastest when it wins, else None.
The arithmetic is the prmt kernels' (bf16 or fp16 products summed in 16-bit pairs per word, float32 across words);
under TRITON_INTERPRET=1 the asm's pure-Triton twin runs (exact float32 products).
"""
from __future__ import annotations

import sys

import torch

from ._triton import HAS_TRITON, interpreter_on, launches_ms, pdl_launch, pdl_mode, pdl_wait, register_opaque_op
from .decode_nf4_prmt import code_regs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .decode_nf4_prmt import _block_rows, _scale_index, _tables, _word_dot_xs, _words

# (BLOCK_N, BLOCK_K, num_warps): a program reads BLOCK_N x BLOCK_K / 8 int32 words (2-16 KB), 8-16 words a thread
CONFIGS = [(8, 512, 2), (16, 512, 4), (32, 512, 4), (16, 512, 2), (4, 1024, 2), (8, 1024, 4), (16, 1024, 4),
           (8, 1024, 2), (32, 1024, 8), (4, 2048, 4), (8, 2048, 4), (16, 2048, 8), (8, 4096, 8)]
INTERPRETER_CONFIG = (4, 32, 1)
_TUNED: dict[tuple, tuple | None] = {}


if HAS_TRITON:
    @triton.jit
    def _nf4_partials_kernel(x_ptr, w_ptr, absmax_ptr, regs_ptr, out_ptr, N, K, words_per_row, n_scales, stride_os,
                             BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                             F16: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr, IDX32: tl.constexpr,
                             USE_PDL: tl.constexpr):
        # EVEN: words_per_row % BLOCK_W == 0 (no word past a row's end). x is read as int32 pairs of the 16-bit
        # compute type (x_ptr typed int32); the packed weights are never written, so they are loaded before pdl_wait.
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        m = tl.program_id(2)
        WPB: tl.constexpr = BLOCKSIZE // 8
        rows, row_ok, row_words, zero = _block_rows(pid_n, N, words_per_row, BLOCK_N, BLOCK_W, IDX32)
        w0 = split * BLOCK_W
        word = _words(w_ptr, row_words, row_ok, w0, words_per_row, BLOCK_W, EVEN)
        pdl_wait(USE_PDL)
        l0, l1, l2, l3, h0, h1, h2, h3 = _tables(regs_ptr, rows, words_per_row, zero, BLOCK_N, BLOCK_W)
        wi = w0 + tl.arange(0, BLOCK_W)
        # rows past N read word 0 and a clamped scale index (their sums are not stored); words past the row's end
        # read x at its last word and are dropped
        sidx = tl.minimum(_scale_index(row_words, wi, WPB, IDX32), n_scales - 1).to(tl.int32)
        xrow = x_ptr + m * (K // 2) + zero
        if EVEN:
            part = _word_dot_xs(word, wi[None, :] + zero, xrow, sidx, absmax_ptr + zero, l0, l1, l2, l3, h0, h1, h2,
                                h3, F16, USE_ASM)
        else:
            part = _word_dot_xs(word, tl.minimum(wi, words_per_row - 1)[None, :] + zero, xrow, sidx,
                                absmax_ptr + zero, l0, l1, l2, l3, h0, h1, h2, h3, F16, USE_ASM)
            part = tl.where((wi < words_per_row)[None, :], part, 0.0)
        tl.store(out_ptr + split * stride_os + m * N + rows, tl.sum(part, axis=1), mask=row_ok)


def splits(k: int, cfg: tuple) -> int:
    return -(-k // cfg[1])


def _check(cfg) -> tuple:
    cfg = tuple(int(c) for c in cfg)
    if (len(cfg) != 3 or any(c < 1 or c & (c - 1) for c in cfg) or cfg[1] < 8):
        raise ValueError(f"nf4_partials config {cfg!r}: expected (BLOCK_N, BLOCK_K, num_warps), powers of two with "
                         "BLOCK_K >= 8; get one from nf4_partials_config()")
    return cfg


def _launch(x, packed, absmax, code, out, n, k, blocksize, cfg) -> None:
    bn, bk, warps = cfg
    f16 = x.dtype == torch.float16
    if x.dtype not in (torch.bfloat16, torch.float16) or x.data_ptr() % 16 or not x.is_contiguous():
        # the asm reads x as 16-byte vectors of the compute type
        x = x.to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
    wpr = k // 8
    bw = bk // 8
    pdl = pdl_mode(packed.device)
    idx32 = (triton.cdiv(n, bn) * bn + 1) * wpr < 2 ** 31
    _nf4_partials_kernel[(triton.cdiv(n, bn), out.shape[0], x.shape[0])](
        x.view(torch.int32), packed.view(torch.int32), absmax, code_regs(code, f16), out, n, k, wpr,
        absmax.numel(), out.stride(0), BLOCKSIZE=blocksize, BLOCK_N=bn, BLOCK_W=bw, F16=f16, EVEN=wpr % bw == 0,
        USE_ASM=not interpreter_on(), IDX32=idx32, USE_PDL=pdl, num_warps=warps, **pdl_launch(pdl))


def fits(k: int, blocksize: int, packed: torch.Tensor, code: torch.Tensor) -> bool:
    """Whole int32 words of a row per 16-byte load (K and blocksize multiples of 8), aligned bytes, a 16-entry code."""
    return (HAS_TRITON and k % 8 == 0 and blocksize % 8 == 0 and packed.data_ptr() % 16 == 0
            and code.numel() == 16)


def nf4_partials_config(n: int, k: int, blocksize: int, packed: torch.Tensor, code: torch.Tensor,
                        dtype=torch.bfloat16, max_splits: int = 16, beat_ms: float | None = None,
                        rows: int = 1) -> tuple | None:
    """The fastest (BLOCK_N, BLOCK_K, num_warps) for this shape with at most `max_splits` partial sums, timed on the
    device (20 launches in a CUDA graph; every config's output first checked against the float32 reference) when it
    is faster than `beat_ms` (the looping kernel's time, by the same timing); None otherwise, off CUDA, or for bytes
    the kernel does not read (see fits). A fixed config under the interpreter. Call it outside torch.compile."""
    if not fits(k, blocksize, packed, code) or dtype not in (torch.bfloat16, torch.float16):
        return None
    if interpreter_on():
        return INTERPRETER_CONFIG if splits(k, INTERPRETER_CONFIG) <= max_splits else None
    if packed.device.type != "cuda":
        return None
    key = (n, k, blocksize, rows, str(packed.device), dtype, max_splits, beat_ms)
    if key in _TUNED:
        return _TUNED[key]
    from .decode_nf4 import TUNE_MAX_ERROR, nf4_gemv_reference, relative_error, tune_inputs

    x, packed_t, absmax_t, code_t = tune_inputs(n, k, blocksize, packed.device, rows, dtype)
    ref = nf4_gemv_reference(x, packed_t, absmax_t, code_t, n, k, blocksize).float()
    best_ms, best = (beat_ms if beat_ms is not None else float("inf")), None
    for cfg in CONFIGS:
        s = splits(k, cfg)
        if s > max_splits or cfg[1] > 8 * k:
            continue
        out = torch.empty(s, rows, n, device=packed.device, dtype=torch.float32)
        try:
            _launch(x, packed_t, absmax_t, code_t, out, n, k, blocksize, cfg)
            if not relative_error(out.sum(0), ref) <= TUNE_MAX_ERROR:
                continue
            ms = launches_ms(lambda c=cfg: _launch(x, packed_t, absmax_t, code_t, out, n, k, blocksize, c), warm=2)
        except Exception:  # noqa: BLE001 - a config this device cannot compile or run is skipped
            continue
        if ms < best_ms:
            best_ms, best = ms, cfg
    _TUNED[key] = best
    return best


def _op_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
             blocksize: int, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    cfg = (block_n, block_k, warps)
    out = torch.empty(splits(k, cfg), x.shape[0], n, device=x.device, dtype=torch.float32)
    sys.modules[__name__]._launch(x.contiguous(), packed, absmax, code, out, n, k, blocksize, cfg)
    return out


def _op_fake(x, packed, absmax, code, n, k, blocksize, block_n, block_k, warps):
    return x.new_empty(splits(k, (block_n, block_k, warps)), x.shape[0], n, dtype=torch.float32)


if HAS_TRITON:
    register_opaque_op("nf4_partials", _op_impl, _op_fake)


def nf4_partials(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
                 blocksize: int, config: tuple) -> torch.Tensor:
    """x [M, K] @ W^T as [S, M, N] float32 partial sums, W the NF4 bytes `packed` with float32 `absmax` per
    `blocksize` elements and the 16-entry `code` table; config from nf4_partials_config."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_partials needs triton (CUDA, or TRITON_INTERPRET=1 on CPU); use "
                           "decode_nf4.nf4_gemv_reference without it")
    return torch.ops.fastlm.nf4_partials(x, packed.reshape(-1), absmax, code.float(), n, k, blocksize, *_check(config))


__all__ = ["nf4_partials", "nf4_partials_config", "CONFIGS"]
