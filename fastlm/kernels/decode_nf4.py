"""NF4 dequant-GEMV for small-batch decode: y = x @ W^T with W read as 4-bit (bitsandbytes NF4 layout).

Layout (bitsandbytes `quantize_4bit`, quant_type="nf4"): W [N, K] flattened row-major, two 4-bit codes per byte
(the first element in the high nibble), one absmax scale per `blocksize` consecutive elements; with double
quantization the absmax values are themselves 8-bit, so `nf4_absmax_fp32` dequantizes them once (engine build).
Decode reads 0.5 byte per weight instead of 2, which is where batch-1 4-bit speed comes from.

`nf4_gemv(x, packed, absmax, code, n, k, blocksize)`: x [M, K] (M small, e.g. <= 4) -> [M, N] in x.dtype. Kernel
variants (the last field of a config; `VARIANTS` names them):
  0 "word": the packed bytes read as int32 words, each code looked up in the 16-entry float32 table in memory
    (the default, and the one that runs under the interpreter);
  1-3 "prmt-*" (decode_nf4_prmt.py): the same loop, codes decoded in registers with PTX byte permutes (CUDA only).
`nf4_gemv_config` times every variant x block config once per shape on the device, after checking each one's
output against the reference (a wrong or failing one is skipped, with a warning), and remembers the fastest.
`nf4_gemv_reference`: the same in pure torch (dequantize, then matmul), for tests and CPU.
"""
from __future__ import annotations

import logging
import sys

import torch

from ._triton import interpreter_on, launches_ms, pdl_launch, pdl_mode, pdl_wait, register_opaque_op
from .decode_nf4_prmt import PRMT_VARIANTS, launch_prmt

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the reference serves
    triton = None

if triton is not None:
    from .decode_nf4_prmt import _words  # the word loader, shared with the prmt kernels


def nf4_absmax_fp32(quant_state) -> torch.Tensor:
    """Per-block absmax as float32, undoing bitsandbytes' double quantization when present."""
    absmax = quant_state.absmax
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:absmax.numel()]
        absmax = s2.code.float()[absmax.long()] * scale + quant_state.offset
    return absmax.float().contiguous()


def _dequantize_elements(packed, absmax, code, e0: int, e1: int, blocksize: int) -> torch.Tensor:
    """Float32 weights e0..e1 (flat, row-major; e0 even) from the packed bytes."""
    b = packed.reshape(-1)[e0 // 2:(e1 + 1) // 2]
    idx = torch.stack(((b >> 4).long(), (b & 15).long()), dim=1).reshape(-1)[:e1 - e0]
    pos = torch.arange(e0, e1, device=b.device) // blocksize
    return code.float()[idx] * absmax.float()[pos]


def nf4_dequantize_reference(packed, absmax, code, n: int, k: int, blocksize: int) -> torch.Tensor:
    """[N, K] float32 weights from the packed bytes."""
    return _dequantize_elements(packed, absmax, code, 0, n * k, blocksize).reshape(n, k)


def nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize) -> torch.Tensor:
    """x [M, K] @ W^T in float32, W dequantized a few million weights at a time (the tuner checks 8B shapes on the
    device with it), cast to x.dtype."""
    rows = n if k % 2 else max(1, (1 << 22) // k)
    xf = x.float()
    outs = [xf @ _dequantize_elements(packed, absmax, code, r0 * k, min(n, r0 + rows) * k, blocksize)
            .reshape(-1, k).t() for r0 in range(0, n, rows)]
    return torch.cat(outs, dim=1).to(x.dtype)


if triton is not None:
    @triton.jit
    def _nf4_gemv_word_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, y_ptr, N, K, BLOCKSIZE: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr,
                              USE_PDL: tl.constexpr):
        # the packed bytes read as int32 words (8 weights each, wide loads); each 4-bit code is looked up in the
        # 16-entry float32 table: 64 bytes, so every lookup of a warp hits distinct L1 banks or broadcasts (the
        # 256-entry table of byte pairs it replaced conflicts). One scale per word, gathered (a word never
        # straddles a block). PREFETCH loads the next step's words before decoding this step's (twice the bytes
        # in flight per warp). With PDL the prefetched words are loaded before pdl_wait, everything else after.
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
        pdl_wait(USE_PDL)
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


# (BLOCK_N, BLOCK_K, num_warps, PREFETCH, VARIANT) tried per (N, K) on first use. On an H100 the word kernel beat the
# 256-entry pair-table kernels it replaced at every Llama-3.2-1B / Llama-3.1-8B decode shape (0.6-1.1 TB/s against
# 0.4-0.85; scripts/gpu_engine_profile.py's sweep); winners then were (4, 1024, 4), (1, 1024, 1) and (2, 2048, 4),
# without prefetch. With the prefetching configs added to the tuning the 8B NF4 decode measured the same (171 vs 175
# tokens/s); no per-shape sweep of them was run.
VARIANTS = {0: "word", **{v: spec[0] for v, spec in PRMT_VARIANTS.items()}}
_WORD_CONFIGS = [(1, 1024, 1, 0), (1, 2048, 1, 0), (1, 2048, 2, 0), (2, 1024, 2, 0), (2, 2048, 4, 0), (4, 512, 2, 0),
                 (4, 1024, 4, 0), (4, 2048, 8, 0), (8, 512, 4, 0), (1, 4096, 4, 0),
                 (1, 512, 1, 1), (1, 1024, 1, 1), (1, 1024, 2, 1), (2, 1024, 2, 1), (2, 512, 2, 1), (4, 512, 2, 1),
                 (4, 1024, 4, 1)]
# the prmt variants (CUDA only), untimed before scripts/gpu_nf4_sweep.py: rows per program, bytes per step and warps
# spread so that a thread decodes 2-8 words per step (SASS compiled for sm_90 on CPU: ~36 instructions per word at
# 8 words a thread, ~39 at 4, 43-47 at 2 with one row per program, against ~140 for the word kernel's loop)
_PRMT_CONFIGS = [(1, 1024, 2, 0), (1, 2048, 2, 1), (2, 1024, 2, 1), (2, 2048, 4, 0), (4, 1024, 4, 0), (4, 1024, 4, 1),
                 (4, 2048, 4, 0), (4, 2048, 4, 1), (8, 512, 4, 1), (8, 1024, 4, 1), (16, 512, 4, 1), (8, 2048, 8, 1)]
_CONFIGS = ([(*c, 0) for c in _WORD_CONFIGS] + [(*c, 1) for c in _PRMT_CONFIGS]
            + [(*c, 2) for c in [(1, 1024, 2, 0), (4, 1024, 4, 1), (4, 2048, 4, 1), (8, 1024, 4, 1)]])
# variants 3 and 4 (x, or the scale, read by Triton instead of the asm) only for scripts/gpu_nf4_sweep.py's
# comparison: the engine's tuner does not compile them (each config costs about a second of warm-up on first use)
SWEEP_ONLY_CONFIGS = [(4, 512, 4, 0, 3), (4, 1024, 4, 1, 3), (4, 1024, 4, 1, 4), (8, 1024, 4, 1, 4)]
INTERPRETER_CONFIG = (4, 512, 2, 1, 0)
TUNE_MAX_ERROR = 1e-2  # relative L2 error vs the float32 reference above which a tuned candidate is rejected
_TUNED: dict[tuple, tuple] = {}
_WARNED: set = set()


def _check_config(cfg) -> tuple:
    """A 5-tuple config; a 4-tuple (made before variants existed) means the word kernel."""
    cfg = tuple(int(c) for c in cfg)
    if len(cfg) == 4:
        cfg = (*cfg, 0)
    if len(cfg) != 5 or cfg[4] not in VARIANTS:
        raise ValueError(f"nf4_gemv config {cfg}: expected (BLOCK_N, BLOCK_K, num_warps, PREFETCH, VARIANT) with "
                         f"VARIANT one of {sorted(VARIANTS)} ({VARIANTS}); get one from nf4_gemv_config()")
    return cfg


def _launch(x, packed, absmax, code, y, n, k, blocksize, cfg):
    bn, bk, warps, prefetch, variant = _check_config(cfg)
    if variant:
        launch_prmt(x, packed, absmax, code, y, n, k, blocksize, bn, bk, warps, prefetch, variant,
                    use_asm=not interpreter_on())
        return
    pdl = pdl_mode(packed.device)
    _nf4_gemv_word_kernel[(triton.cdiv(n, bn), x.shape[0])](x, packed.view(torch.int32), absmax, code, y, n, k,
                                                            BLOCKSIZE=blocksize, BLOCK_N=bn, BLOCK_W=bk // 8,
                                                            PREFETCH=bool(prefetch), USE_PDL=pdl, num_warps=warps,
                                                            **pdl_launch(pdl))


def _fits(k: int, blocksize: int, packed: torch.Tensor | None = None) -> bool:
    """The kernel reads whole int32 words (16-byte loads): K and blocksize multiples of 8, aligned bytes."""
    return k % 8 == 0 and blocksize % 8 == 0 and (packed is None or packed.data_ptr() % 16 == 0)


def graph_launch_ms(fn, launches: int = 20, reps: int = 3) -> float:
    """The tuner's timing: `launches_ms` after two eager calls (compile, warm)."""
    return launches_ms(fn, launches, reps, warm=2)


def tune_inputs(n: int, k: int, blocksize: int, device, rows: int = 1, dtype=torch.bfloat16):
    """Random packed bytes, positive scales, a sorted code table (NF4-like: negative half first) and x."""
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(n * k // blocksize, device=device) + 0.05
    code = torch.linspace(-1, 1, 16, device=device)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    return x, packed, absmax, code


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _tune(n, k, blocksize, inputs, candidates, time_ms) -> tuple[tuple | None, list]:
    """The fastest correct candidate: each one is launched once and its output compared with the reference
    (relative error <= TUNE_MAX_ERROR), then timed by time_ms(fn). Returns (best or None, [(cfg, why) skipped])."""
    x, packed, absmax, code = inputs
    ref = nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize).float()
    y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    best, skipped = None, []
    for cfg in candidates:
        try:
            y.fill_(float("nan"))
            _launch(x, packed, absmax, code, y, n, k, blocksize, cfg)
            err = relative_error(y, ref)
            if not err <= TUNE_MAX_ERROR:  # NaN fails too
                skipped.append((cfg, f"wrong: relative error {err:.3g}"))
                continue
            ms = time_ms(lambda c=cfg: _launch(x, packed, absmax, code, y, n, k, blocksize, c))
        except Exception as exc:  # noqa: BLE001 - a config this device cannot compile or run is skipped
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            skipped.append((cfg, f"failed: {type(exc).__name__}: {first}"))
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return (best[1] if best else None), skipped


def _warn_skipped(skipped) -> None:
    """One warning per variant that produced a wrong result or failed (the first reason)."""
    for cfg, why in skipped:
        variant = cfg[4]
        if variant not in _WARNED:
            _WARNED.add(variant)
            logger.warning("fastlm nf4_gemv: kernel variant %r skipped by the tuner (%s, config %s)",
                           VARIANTS[variant], why, cfg)


def tune_candidates(dtype) -> list[tuple]:
    """The configs the tuner tries for x of this dtype: the word kernel's, and the prmt variant computing in that
    dtype (bf16: variant 1, fp16: variant 2) - the other would convert x every call (and a bf16 x converted to fp16
    could overflow), so it is not offered."""
    own = {torch.bfloat16: 1, torch.float16: 2}.get(dtype)
    return [c for c in _CONFIGS if c[4] in (0, own)]


def nf4_gemv_config(n: int, k: int, blocksize: int, device, rows: int = 1,
                    packed: torch.Tensor | None = None, dtype=torch.bfloat16) -> tuple | None:
    """The fastest correct (BLOCK_N, BLOCK_K, num_warps, PREFETCH, VARIANT) for this shape and x dtype, timed once
    on the device (a few ms per config; every candidate's output is first checked against the reference) and
    remembered; a fixed word-kernel config under the interpreter; None when the kernel cannot read these bytes (see
    _fits). Call it outside torch.compile."""
    if not _fits(k, blocksize, packed):
        return None
    if interpreter_on() or torch.device(device).type != "cuda":
        return INTERPRETER_CONFIG
    key = (n, k, blocksize, rows, str(device), dtype)
    if key in _TUNED:
        return _TUNED[key]
    inputs = tune_inputs(n, k, blocksize, device, rows, dtype)
    best, skipped = _tune(n, k, blocksize, inputs, tune_candidates(dtype), graph_launch_ms)
    _warn_skipped(skipped)
    _TUNED[key] = best or (*_WORD_CONFIGS[0], 0)
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
        config = nf4_gemv_config(n, k, blocksize, x.device, m, packed, x.dtype)
    if config is None:
        return nf4_gemv_reference(x, packed, absmax, code, n, k, blocksize)
    # an opaque op for torch.compile: the engine's compiled step makes the launch eager mode makes
    return torch.ops.fastlm.nf4_gemv(x, packed, absmax, code.float(), n, k, blocksize, *_check_config(config))


def _op_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
             blocksize: int, block_n: int, block_k: int, warps: int, prefetch: int, variant: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    sys.modules[__name__]._launch(x.contiguous(), packed, absmax, code, y, n, k, blocksize,
                                  (block_n, block_k, warps, prefetch, variant))
    return y


def _op_fake(x, packed, absmax, code, n, k, blocksize, block_n, block_k, warps, prefetch, variant):
    return x.new_empty(x.shape[0], n)


if triton is not None:
    register_opaque_op("nf4_gemv", _op_impl, _op_fake)
