"""NF4 dequant-GEMV for small-batch decode: y = x @ W^T with W read as 4-bit (bitsandbytes NF4 layout).

Layout (bitsandbytes `quantize_4bit`, quant_type="nf4"): W [N, K] flattened row-major, two 4-bit codes per byte
(the first element in the high nibble), one absmax scale per `blocksize` consecutive elements; with double
quantization the absmax values are themselves 8-bit, so `nf4_absmax_fp32` dequantizes them once (engine build).
Decode reads 0.5 byte per weight instead of 2, which is where batch-1 4-bit speed comes from.

`nf4_gemv(x, packed, absmax, code, n, k, blocksize)`: x [M, K] (M small, e.g. <= 4) -> [M, N] in x.dtype, by the
kernel that reads the packed bytes as int32 words and looks each code up in the 16-entry table, its block sizes
timed once per shape on the device.
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
    def _words(w_ptr, row_words, row_ok, w0, words_per_row, BLOCK_W: tl.constexpr):
        wi = w0 + tl.arange(0, BLOCK_W)
        return tl.load(w_ptr + row_words + wi[None, :], mask=row_ok[:, None] & (wi < words_per_row)[None, :], other=0)

    @triton.jit
    def _nf4_gemv_word_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, y_ptr, N, K, BLOCKSIZE: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr):
        # the packed bytes read as int32 words (8 weights each, wide loads); each 4-bit code is looked up in the
        # 16-entry float32 table: 64 bytes, so every lookup of a warp hits distinct L1 banks or broadcasts (the
        # 256-entry table of byte pairs it replaced conflicts). One scale per word, gathered (a word never
        # straddles a block). PREFETCH loads the next step's words before decoding this step's (twice the bytes
        # in flight per warp).
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
        if PREFETCH:
            nxt = _words(w_ptr, row_words, row_ok, 0, words_per_row, BLOCK_W)
        for w0 in range(0, words_per_row, BLOCK_W):
            if PREFETCH:
                word = nxt
                nxt = _words(w_ptr, row_words, row_ok, w0 + BLOCK_W, words_per_row, BLOCK_W)
            else:
                word = _words(w_ptr, row_words, row_ok, w0, words_per_row, BLOCK_W)
            wi = w0 + tl.arange(0, BLOCK_W)
            w_ok = wi < words_per_row
            val = tl.load(code_ptr + ((word[:, :, None] >> shift[None, None, :]) & 15))
            xv = tl.load(x_ptr + m * K + wi[:, None] * 8 + tl.arange(0, 8)[None, :], mask=w_ok[:, None],
                         other=0.0).to(tl.float32)
            part = tl.sum(val * xv[None, :, :], axis=2)  # [BLOCK_N, BLOCK_W]
            scale = tl.load(absmax_ptr + (row_words + wi[None, :]) // WPB, mask=row_ok[:, None] & w_ok[None, :],
                            other=0.0)
            acc += tl.sum(part * scale, axis=1)
        tl.store(y_ptr + m * N + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


# (BLOCK_N, BLOCK_K, num_warps, PREFETCH) tried per (N, K) on first use. On an H100 the word kernel beat the 256-entry
# pair-table kernels it replaced at every Llama-3.2-1B / Llama-3.1-8B decode shape (0.6-1.1 TB/s against 0.4-0.85;
# scripts/gpu_engine_profile.py's sweep); winners then were (4, 1024, 4), (1, 1024, 1) and (2, 2048, 4), without
# prefetch. With the prefetching configs added to the tuning the 8B NF4 decode measured the same (171 vs 175
# tokens/s); no per-shape sweep of them was run.
_CONFIGS = [(1, 1024, 1, 0), (1, 2048, 1, 0), (1, 2048, 2, 0), (2, 1024, 2, 0), (2, 2048, 4, 0), (4, 512, 2, 0),
            (4, 1024, 4, 0), (4, 2048, 8, 0), (8, 512, 4, 0), (1, 4096, 4, 0),
            (1, 512, 1, 1), (1, 1024, 1, 1), (1, 1024, 2, 1), (2, 1024, 2, 1), (2, 512, 2, 1), (4, 512, 2, 1),
            (4, 1024, 4, 1)]
_TUNED: dict[tuple, tuple] = {}


def _launch(x, packed, absmax, code, y, n, k, blocksize, cfg):
    bn, bk, warps, prefetch = cfg
    _nf4_gemv_word_kernel[(triton.cdiv(n, bn), x.shape[0])](x, packed.view(torch.int32), absmax, code, y, n, k,
                                                            BLOCKSIZE=blocksize, BLOCK_N=bn, BLOCK_W=bk // 8,
                                                            PREFETCH=bool(prefetch), num_warps=warps)


def _fits(k: int, blocksize: int, packed: torch.Tensor | None = None) -> bool:
    """The kernel reads whole int32 words (16-byte loads): K and blocksize multiples of 8, aligned bytes."""
    return k % 8 == 0 and blocksize % 8 == 0 and (packed is None or packed.data_ptr() % 16 == 0)


def nf4_gemv_config(n: int, k: int, blocksize: int, device, rows: int = 1,
                    packed: torch.Tensor | None = None) -> tuple | None:
    """The fastest (BLOCK_N, BLOCK_K, num_warps, PREFETCH) for this shape, timed once on the device (a few ms per
    config) and remembered; a fixed config under the interpreter; None when the kernel cannot read these bytes (see
    _fits). Call it outside torch.compile."""
    if not _fits(k, blocksize, packed):
        return None
    if interpreter_on() or torch.device(device).type != "cuda":
        return (4, 512, 2, 1)
    key = (n, k, blocksize, rows, str(device))
    if key in _TUNED:
        return _TUNED[key]
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(n * k // blocksize, device=device)
    code = torch.linspace(-1, 1, 16, device=device)
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    y = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
    best = None
    for cfg in _CONFIGS:  # timed as 20 launches in a CUDA graph: kernel time, not launch overhead
        try:
            for _ in range(2):
                _launch(x, packed, absmax, code, y, n, k, blocksize, cfg)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    _launch(x, packed, absmax, code, y, n, k, blocksize, cfg)
            ms = graph_replay_ms(graph, 3)
        except Exception:  # noqa: BLE001 - a config this device cannot run is skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    _TUNED[key] = best[1] if best else _CONFIGS[0]
    return _TUNED[key]


def nf4_gemv(x, packed, absmax, code, n: int, k: int, blocksize: int, config: tuple | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] (x.dtype), reading the weight as 4-bit. Needs triton (CUDA, or CPU under
    TRITON_INTERPRET=1); see nf4_gemv_reference for the math. Shapes with a fitting config (K and blocksize
    multiples of 8: every real model's) run the kernel with `config` = `nf4_gemv_config(...)` (made once by callers
    that decode many tokens; made here otherwise); other shapes dequantize and multiply."""
    if triton is None:
        return nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize)
    if k % 2 or blocksize % 2:
        raise ValueError(f"nf4_gemv needs an even K and blocksize, got K={k}, blocksize={blocksize}")
    x = x.contiguous()
    m = x.shape[0]
    packed = packed.reshape(-1)
    if config is None:
        config = nf4_gemv_config(n, k, blocksize, x.device, m, packed)
    if config is None:
        return nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize)
    # an opaque op for torch.compile: the engine's compiled step makes the launch eager mode makes
    return torch.ops.fastlm.nf4_gemv(x, packed, absmax, code.float(), n, k, blocksize, *config)


def _op_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
             blocksize: int, block_n: int, block_k: int, warps: int, prefetch: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    sys.modules[__name__]._launch(x.contiguous(), packed, absmax, code, y, n, k, blocksize,
                                  (block_n, block_k, warps, prefetch))
    return y


def _op_fake(x, packed, absmax, code, n, k, blocksize, block_n, block_k, warps, prefetch):
    return x.new_empty(x.shape[0], n)


if triton is not None:
    register_opaque_op("nf4_gemv", _op_impl, _op_fake)
