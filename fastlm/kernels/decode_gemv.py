"""Split-K GEMV for the decode step: y = x @ W^T for a few rows, as fp32 partial sums that the next kernel adds.

    gemv_partials(x [M, K], w [N, K], config) -> [S, M, N] float32, summing over S gives x @ W^T

At batch 1 a decode projection is a GEMV that should run at the memory bandwidth; cuBLAS' GEMVs reached 1.4-2.6 TB/s
on the H100 at the Llama-3.2-1B shapes (2048 x 2048: 5.9 us for 8.4 MB). Here every program reads one [BLOCK_N,
BLOCK_K * STEPS] tile of W in a single pass of wide loads (all of them in flight: no loop waits on memory), so the
grid is N/BLOCK_N x S programs; the S partial sums are not reduced here but by the epilogue kernel that consumes
the output anyway (kernels/decode_epilogue.py: every input y there is [S, M, N]). The config is timed per shape on
the device against cuBLAS (`gemv_config`); None means cuBLAS was faster (the caller then uses F.linear, S = 1).
`gemv_reference` is the same in torch.

On Hopper the kernel is launched with programmatic dependent launch (kernels/_triton.py `pdl_mode`): a program
issues its weight loads, then waits for the previous kernel (which wrote x) before it reads x or stores, so the
weights stream in while the previous kernel drains. The tuner times the configs launched that way.
"""
from __future__ import annotations

import sys

import torch

from ._triton import (HAS_TRITON, interpreter_on, jit, launches_ms, next_pow2, pdl_launch, pdl_mode, pdl_wait,
                      register_opaque_op, tl)

MAX_SPLITS = 16  # partial sums the consumers add (their loads of y are unrolled over S)
# (BLOCK_N, BLOCK_K, STEPS, num_warps): a program reads BLOCK_N x BLOCK_K * STEPS weights (16-64 KB)
_CONFIGS = [(16, 512, 1, 4), (16, 512, 2, 4), (32, 256, 1, 4), (32, 256, 2, 4), (8, 1024, 1, 4), (8, 1024, 2, 4),
            (32, 512, 1, 8), (64, 256, 1, 8), (16, 1024, 1, 8), (4, 2048, 1, 4), (16, 512, 4, 4), (32, 512, 2, 8),
            (8, 512, 2, 2), (16, 256, 2, 2)]
_TUNED: dict[tuple, tuple | None] = {}


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().t())[None]


@jit
def _w_tile(w_ptr, n, n_ok, stride_w, k0, K, BLOCK_K: tl.constexpr):
    """W[n, k0:k0 + BLOCK_K] (zeros past N and K)."""
    k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=n_ok[:, None] & (k < K)[None, :],
                   other=0.0)


@jit
def _tile_dot(w, x_ptr, k0, K, BLOCK_K: tl.constexpr):
    """The fp32 dot of each row of the weight tile w with x[k0:k0 + BLOCK_K]: [BLOCK_N]."""
    k = k0 + tl.arange(0, BLOCK_K)
    xv = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return tl.sum(w.to(tl.float32) * xv[None, :], axis=1)


@jit
def _gemv_partials_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_x, stride_w, stride_os, stride_or,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEPS: tl.constexpr, USE_PDL: tl.constexpr):
    # the program's STEPS weight tiles are loaded first, then pdl_wait (with PDL, the weights - which no kernel
    # writes - stream in while the previous kernel finishes), then x and the sums; without PDL the same code
    tl.static_assert(STEPS == 1 or STEPS == 2 or STEPS == 4, "STEPS must be 1, 2 or 4")
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k0 = split * STEPS * BLOCK_K
    w0 = _w_tile(w_ptr, n, n_ok, stride_w, k0, K, BLOCK_K)
    if STEPS >= 2:
        w1 = _w_tile(w_ptr, n, n_ok, stride_w, k0 + BLOCK_K, K, BLOCK_K)
    if STEPS == 4:
        w2 = _w_tile(w_ptr, n, n_ok, stride_w, k0 + 2 * BLOCK_K, K, BLOCK_K)
        w3 = _w_tile(w_ptr, n, n_ok, stride_w, k0 + 3 * BLOCK_K, K, BLOCK_K)
    pdl_wait(USE_PDL)
    x_row = x_ptr + row * stride_x
    acc = _tile_dot(w0, x_row, k0, K, BLOCK_K)
    if STEPS >= 2:
        acc += _tile_dot(w1, x_row, k0 + BLOCK_K, K, BLOCK_K)
    if STEPS == 4:
        acc += _tile_dot(w2, x_row, k0 + 2 * BLOCK_K, K, BLOCK_K)
        acc += _tile_dot(w3, x_row, k0 + 3 * BLOCK_K, K, BLOCK_K)
    tl.store(out_ptr + split * stride_os + row * stride_or + n, acc, mask=n_ok)


def splits(k: int, cfg: tuple) -> int:
    return -(-k // (cfg[1] * cfg[2]))


def _launch(x, w, out, cfg):
    bn, bk, steps, warps = cfg
    n, k = w.shape
    pdl = pdl_mode(w.device)
    _gemv_partials_kernel[(-(-n // bn), out.shape[0], x.shape[0])](
        x, w, out, n, k, x.stride(0), w.stride(0), out.stride(0), out.stride(1), BLOCK_N=bn, BLOCK_K=bk,
        STEPS=steps, USE_PDL=pdl, num_warps=warps, **pdl_launch(pdl))


def _fits(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.stride(1) == 1 and w.dtype in (torch.bfloat16, torch.float16, torch.float32)


def gemv_config(w: torch.Tensor, rows: int = 1, max_splits: int = MAX_SPLITS) -> tuple | None:
    """The fastest config for W's shape when it beats cuBLAS' F.linear on this device (timed once per shape, 20
    launches in a CUDA graph, each candidate's output checked against F.linear) with at most `max_splits` partial
    sums; None otherwise, off CUDA, or for a weight the kernel does not read. A fixed config under the interpreter
    (tests). Call it outside torch.compile."""
    if not HAS_TRITON or not _fits(w):
        return None
    if interpreter_on():  # K of a tiny test model spans several splits of 32
        steps = next_pow2(-(-w.shape[1] // (32 * max_splits)))
        return (16, 32 * max(1, steps // 4), min(4, steps), 1)
    if w.device.type != "cuda":
        return None
    n, k = w.shape
    key = (n, k, w.dtype, rows, str(w.device), max_splits)
    if key in _TUNED:
        return _TUNED[key]
    x = torch.randn(rows, k, device=w.device, dtype=w.dtype)
    expect = torch.nn.functional.linear(x, w).float()

    best_ms, best = launches_ms(lambda: torch.nn.functional.linear(x, w)), None
    for cfg in _CONFIGS:
        s = splits(k, cfg)
        if s > min(max_splits, MAX_SPLITS):
            continue
        out = torch.empty(s, rows, n, device=w.device, dtype=torch.float32)
        try:
            _launch(x, w, out, cfg)
            got = out.sum(0)
            if not torch.allclose(got, expect, rtol=2e-2, atol=2e-2 * expect.abs().max().item()):
                continue
            ms = launches_ms(lambda: _launch(x, w, out, cfg))
        except Exception:  # noqa: BLE001 - a config this device cannot run is skipped
            continue
        if ms < best_ms:
            best_ms, best = ms, cfg
    _TUNED[key] = best
    return best


def _op_impl(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, steps: int, warps: int) -> torch.Tensor:
    cfg = (block_n, block_k, steps, warps)
    out = torch.empty(splits(w.shape[1], cfg), x.shape[0], w.shape[0], device=x.device, dtype=torch.float32)
    sys.modules[__name__]._launch(x.contiguous(), w, out, cfg)
    return out


def _op_fake(x, w, block_n, block_k, steps, warps):
    return x.new_empty(splits(w.shape[1], (block_n, block_k, steps, warps)), x.shape[0], w.shape[0],
                       dtype=torch.float32)


if HAS_TRITON:
    register_opaque_op("gemv_partials", _op_impl, _op_fake)


def gemv_partials(x: torch.Tensor, w: torch.Tensor, config: tuple) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T as [S, M, N] fp32 partial sums (see the module docstring); config from gemv_config."""
    if (len(config) != 4 or config[2] not in (1, 2, 4) or any(int(c) != c or c < 1 for c in config)
            or next_pow2(config[0]) != config[0] or next_pow2(config[1]) != config[1]):
        raise ValueError(f"gemv_partials config {config!r}: expected (BLOCK_N, BLOCK_K, STEPS, num_warps) with "
                         "BLOCK_N and BLOCK_K powers of two and STEPS 1, 2 or 4; get one from gemv_config()")
    return torch.ops.fastlm.gemv_partials(x, w, *config)
