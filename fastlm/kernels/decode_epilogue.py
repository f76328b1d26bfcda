"""Fused epilogues of the engine's decode step: the small work between a layer's projections, one launch each.

At batch 1 the projections are GEMVs that move nearly all the bytes; the work between them (LoRA up-projections,
RoPE, the KV-cache write, the activation, the residual add and the next norm) was about a dozen launches per layer
in inductor's compiled step, 1-4 us each (scripts/gpu_engine_profile.py, H100). These kernels do it in three:

    qkv_rope_cache(y, xa, lora, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim) -> q [B, H * D]
        y [B, >= (H + 2 KV) D]: the q/k/v projection's output, q | k | v side by side (or split-K partial sums
        [S, B, ...], added here); each output gets its adapters' term xa @ B^T (unmerged LoRA: xa = x A^T [B, R],
        B^T = (scale * B)^T); q and k are rotated (rotate-half RoPE over the whole head, cos/sin [L, D] tables
        indexed by each row's position); k and v are written into cache slot b (row b) at that position, in place;
        q is returned.
    lora_act_mul(y, xa, lora, inter, act, dtype) -> [B, I]
        act(gate) * up, gate = y[:, :I] + its adapter term, up = y[:, I:2I] + its term; act 0 silu, 2 gelu-tanh.
    lora_residual_norm(x, y, xa, lora, weight, eps, gemma) -> (x + a, rms_norm(x + a))
        a = y[:, :H] + its adapter term; the norm as transformers computes it: llama (s * rstd).to(dtype) * w,
        gemma (s * rstd * (1 + w)).to(dtype), rstd from the rounded residual sum s. A row is spread over
        programs of NORM_CONFIG's BLOCK columns (one program read the whole B^T, 64 KB at Llama-3.2-1B r16: 4.1 us
        a launch on the H100); the row's last program to finish, found with an atomic ticket counter, normalises
        it. The counters (`row_counters`, zeroed, per device) are left zeroed by each launch, so launches must be
        stream-ordered, and the first call (which allocates them) must not be inside a CUDA graph capture.

`lora` is None (no adapter), B^T [R, N] block-diagonal, or (B^T [r, N], offsets) where the output slices share
B^T's rows and offsets[i] is slice i's first rank in xa. Rounding follows the unfused step: each projection output
with its adapter term is rounded to the activation dtype once, as are the residual sum and the activation. The
`*_reference` functions are the same math in torch, the tests' oracle. The ops are opaque to torch.compile (their
launches run as eager mode makes them); `qkv_rope_cache` declares its cache writes. Launch sizes: NORM_CONFIG,
ACT_CONFIG and QKV_CONFIG below (the launchers take a `config` too; scripts/gpu_epilogue_bench.py sweeps them).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from ..errors import UnsupportedFeatureError
from ._triton import HAS_TRITON, jit, next_pow2, pdl_launch, pdl_mode, pdl_wait, register_opaque_op, tl
from .reference import rotate_half

SILU, GELU_TANH = 0, 2
ACTIVATIONS = {"silu": SILU, "gelu_tanh": GELU_TANH}  # the resolved architecture's names
# launch configs, (block, num_warps) each (scripts/gpu_epilogue_bench.py sweeps them on the GPU): the residual
# norm's BLOCK columns of a row per program, the activation's BLOCK columns of gate and of up per program, the qkv
# epilogue's BLOCK_HALF rotation pairs of a head per program
# the fastest in scripts/gpu_epilogue_bench.py's sweep on the H100 (cold L2, 1 row, 4 partial sums, LoRA r16) at
# Llama-3.2-1B and 3.1-8B alike: norm 3.60/3.95 us, activation 3.02/3.63, q/k/v 2.34/2.40
NORM_CONFIG = (128, 2)
ACT_CONFIG = (32, 4)
QKV_CONFIG = (32, 1)
# without adapters a norm over one GEMV output (no partial sums) is faster as one program per row (H100: 1.38 us
# against 2.24 split at hidden 2048, 1.79 against 2.68 at 4096): this many warps then
NORM_ROW_WARPS = 4


# ---------------------------------------------------------------- references (pure torch)
def _plain(t):
    """[S, M, N] partial sums -> their fp32 sum [M, N]; a [M, N] tensor -> fp32."""
    return t.float().sum(0) if t.dim() == 3 else t.float()


def _with_adapter(y, xa, lora_bt, start: int, stop: int, dtype, xoff: int = 0):
    """y's columns start:stop plus their adapters' term: xa's ranks xoff.. (as many as bt has rows) @ bt."""
    out = _plain(y)[:, start:stop]
    if xa is not None:
        out = out + _plain(xa)[:, xoff:xoff + lora_bt.shape[0]] @ lora_bt[:, start:stop].float()
    return out.to(dtype)


def _adapter_parts(lora, slices: int):
    """`lora` as the ops take it: None, B^T (block-diagonal, every slice's ranks at offset 0) or (B^T, offsets)
    -> (B^T or None, a list of `slices` offsets)."""
    if lora is None:
        return None, [0] * slices
    if isinstance(lora, torch.Tensor):
        return lora, [0] * slices
    bt, offsets = lora
    offsets = list(offsets) + [0] * (slices - len(offsets))
    return bt, offsets[:slices]


def qkv_rope_cache_reference(y, xa, lora, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int,
                             head_dim: int) -> torch.Tensor:
    dt, d = k_cache.dtype, head_dim
    b = y.shape[-2]
    bt, (oq, ok, ov) = _adapter_parts(lora, 3)
    q = _with_adapter(y, xa, bt, 0, n_heads * d, dt, oq).view(b, n_heads, d)
    k = _with_adapter(y, xa, bt, n_heads * d, (n_heads + n_kv) * d, dt, ok).view(b, n_kv, d)
    v = _with_adapter(y, xa, bt, (n_heads + n_kv) * d, (n_heads + 2 * n_kv) * d, dt, ov).view(b, n_kv, d)
    c, s = cos[pos].float()[:, None], sin[pos].float()[:, None]
    q = (q.float() * c + rotate_half(q.float()) * s).to(dt)
    k = (k.float() * c + rotate_half(k.float()) * s).to(dt)
    rows = torch.arange(b, device=y.device)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    return q.reshape(b, n_heads * d)


def lora_act_mul_reference(y, xa, lora, inter: int, act: int, dtype=None) -> torch.Tensor:
    dtype = dtype or y.dtype
    bt, (og, ou) = _adapter_parts(lora, 2)
    g = _with_adapter(y, xa, bt, 0, inter, dtype, og).float()
    u = _with_adapter(y, xa, bt, inter, 2 * inter, dtype, ou)
    a = torch.nn.functional.silu(g) if act == SILU else torch.nn.functional.gelu(g, approximate="tanh")
    return (a.to(dtype).float() * u.float()).to(dtype)


def lora_residual_norm_reference(x, y, xa, lora, weight, eps: float, gemma: bool):
    hidden = x.shape[-1]
    bt, (off,) = _adapter_parts(lora, 1)
    s = (x.float() + _with_adapter(y, xa, bt, 0, hidden, x.dtype, off).float()).to(x.dtype)
    sf = s.float()
    normed = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        out = (normed * (1.0 + weight.float())).to(x.dtype)
    else:
        out = (normed.to(x.dtype).float() * weight.float()).to(torch.promote_types(x.dtype, weight.dtype))
    return s, out.to(x.dtype)


# ---------------------------------------------------------------- kernels
# Every kernel issues all its loads before it sums or changes a layout: those steps go through warp shuffles or a
# CTA barrier that wait for the loads issued so far, so a load written after one costs a second trip to memory.
# The kernels interleaved them: their sm_90 code waited on memory 4 times in lora_act_mul (5.8 us a launch on the
# H100) and in lora_residual_norm, 3 times in qkv_rope_cache (the cos/sin loads wait for pos: that one stays).
# Partial sums are loaded as one [S, n] tile (vector loads, summed after), not S loads with an add after each.
@jit
def _partials(ptr, offs, mask, stride_s, S, SP: tl.constexpr):
    """The S partial sums ptr[s * stride_s + offs] (a split-K GEMV's outputs; S = 1: its output) as one [SP, n]
    tile, rows >= S zero; `_total` sums them once every load is issued."""
    s = tl.arange(0, SP)
    return tl.load(ptr + s[:, None] * stride_s + offs[None, :], mask=(s < S)[:, None] & mask[None, :], other=0.0)


@jit
def _total(tile):
    return tl.sum(tile.to(tl.float32), axis=0)


@jit
def _bt_tile(bt_ptr, cols, ok, R, stride_bt, BLOCK_R: tl.constexpr):
    """B^T[:, cols] as one [BLOCK_R, cols] tile (a loop over ranks waited on a load per rank: 9-26 us a launch)."""
    r = tl.arange(0, BLOCK_R)
    return tl.load(bt_ptr + r[:, None] * stride_bt + cols[None, :], mask=(r < R)[:, None] & ok[None, :], other=0.0)


@jit
def _xa_tile(xa_ptr, stride_xas, S_XA, R, BLOCK_R: tl.constexpr, SP_XA: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    return _partials(xa_ptr, r, r < R, stride_xas, S_XA, SP_XA)


@jit
def _adapter_term(xa, bt):
    """xa @ bt in fp32 from the tiles of `_xa_tile` and `_bt_tile`."""
    return tl.sum(bt.to(tl.float32) * _total(xa)[:, None], axis=0)


@jit
def _qkv_store(lo, hi, i, ok, row, head, pos, q_ptr, kc_ptr, vc_ptr, stride_q, stride_cb, stride_ch, stride_cl,
               H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr):
    """Head `head`'s halves [lo, hi] (pairs i) into q (q heads) or cache slot `row` at `pos` (k, then v heads)."""
    if head < H:
        out = q_ptr + row * stride_q + head * (2 * HALF)
        tl.store(out + i, lo.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(out + HALF + i, hi.to(q_ptr.dtype.element_ty), mask=ok)
    else:
        kv_head = (head - H) % KV
        dst = row.to(tl.int64) * stride_cb + kv_head * stride_ch + pos * stride_cl
        if head < H + KV:
            tl.store(kc_ptr + dst + i, lo.to(kc_ptr.dtype.element_ty), mask=ok)
            tl.store(kc_ptr + dst + HALF + i, hi.to(kc_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(vc_ptr + dst + i, lo.to(vc_ptr.dtype.element_ty), mask=ok)
            tl.store(vc_ptr + dst + HALF + i, hi.to(vc_ptr.dtype.element_ty), mask=ok)


@jit
def _qkv_rope_cache_kernel(y_ptr, xa_ptr, bt_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, stride_ys,
                           stride_y, stride_xas, stride_xa, stride_bt, stride_cos, stride_q, stride_cb, stride_ch,
                           stride_cl, R, XQ, XK, XV, S, S_XA, H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr,
                           BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, SP: tl.constexpr, SP_XA: tl.constexpr,
                           USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1: q heads, then KV k heads, then KV v heads (y's column order)
    i = tl.program_id(2) * BLOCK_HALF + tl.arange(0, BLOCK_HALF)  # this program's part of each half of the head
    ok = i < HALF
    col = head * (2 * HALF) + i
    if BLOCK_R > 1:  # the adapters' B^T, which no kernel writes: before the wait
        bt_lo = _bt_tile(bt_ptr, col, ok, R, stride_bt, BLOCK_R)
        bt_hi = _bt_tile(bt_ptr, col + HALF, ok, R, stride_bt, BLOCK_R)
    pdl_wait(USE_PDL)
    pos = tl.load(pos_ptr + row).to(tl.int64)  # first: the cos/sin loads wait for it
    lo = _partials(y_ptr + row * stride_y, col, ok, stride_ys, S, SP)
    hi = _partials(y_ptr + row * stride_y, col + HALF, ok, stride_ys, S, SP)
    if BLOCK_R > 1:
        xoff = tl.where(head < H, XQ, tl.where(head < H + KV, XK, XV))  # this slice's first rank in xa
        xa = _xa_tile(xa_ptr + row * stride_xa + xoff, stride_xas, S_XA, R, BLOCK_R, SP_XA)
    c_lo = tl.load(cos_ptr + pos * stride_cos + i, mask=ok, other=0.0).to(tl.float32)  # (v heads do not rotate)
    c_hi = tl.load(cos_ptr + pos * stride_cos + HALF + i, mask=ok, other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + pos * stride_cos + i, mask=ok, other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + pos * stride_cos + HALF + i, mask=ok, other=0.0).to(tl.float32)
    lo = _total(lo)
    hi = _total(hi)
    if BLOCK_R > 1:
        lo += _adapter_term(xa, bt_lo)
        hi += _adapter_term(xa, bt_hi)
    out_ty = q_ptr.dtype.element_ty
    lo = lo.to(out_ty).to(tl.float32)  # the projection's output in the activation dtype
    hi = hi.to(out_ty).to(tl.float32)
    if head < H + KV:  # q and k heads rotate: [lo, hi] * cos + [-hi, lo] * sin
        lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
    _qkv_store(lo, hi, i, ok, row, head, pos, q_ptr, kc_ptr, vc_ptr, stride_q, stride_cb, stride_ch, stride_cl, H, KV,
               HALF)


@jit
def _lora_act_mul_kernel(y_ptr, xa_ptr, bt_ptr, h_ptr, stride_ys, stride_y, stride_xas, stride_xa, stride_bt,
                         stride_h, R, INTER, XG, XU, S, S_XA, ACT: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_R: tl.constexpr, SP: tl.constexpr, SP_XA: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < INTER
    if BLOCK_R > 1:  # the adapters' B^T, which no kernel writes: before the wait
        bt_g = _bt_tile(bt_ptr, cols, ok, R, stride_bt, BLOCK_R)
        bt_u = _bt_tile(bt_ptr, INTER + cols, ok, R, stride_bt, BLOCK_R)
    pdl_wait(USE_PDL)
    g = _partials(y_ptr + row * stride_y, cols, ok, stride_ys, S, SP)
    u = _partials(y_ptr + row * stride_y, INTER + cols, ok, stride_ys, S, SP)
    if BLOCK_R > 1:
        xa_row = xa_ptr + row * stride_xa
        xa_g = _xa_tile(xa_row + XG, stride_xas, S_XA, R, BLOCK_R, SP_XA)
        xa_u = _xa_tile(xa_row + XU, stride_xas, S_XA, R, BLOCK_R, SP_XA)
    g = _total(g)
    u = _total(u)
    if BLOCK_R > 1:
        g += _adapter_term(xa_g, bt_g)
        u += _adapter_term(xa_u, bt_u)
    out_ty = h_ptr.dtype.element_ty
    g = g.to(out_ty).to(tl.float32)
    u = u.to(out_ty).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi)
        inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)  # tanh saturates well before; exp() stays finite
        a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    a = a.to(out_ty).to(tl.float32)
    tl.store(h_ptr + row * stride_h + cols, (a * u).to(out_ty), mask=ok)


@jit
def _rms_norm_store(s, w, cols, ok, out_ptr, HIDDEN, eps, GEMMA: tl.constexpr):
    """out[cols] = rms_norm(s) * w for s, a whole row in fp32 (its rstd from these values), w its weights."""
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / HIDDEN + eps)
    w = w.to(tl.float32)
    if GEMMA:
        out = s * rstd * (1.0 + w)
    else:
        out = (s * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


@jit
def _lora_residual_norm_kernel(x_ptr, y_ptr, xa_ptr, bt_ptr, w_ptr, s_ptr, out_ptr, count_ptr, stride_x, stride_ys,
                               stride_y, stride_xas, stride_xa, stride_bt, stride_s, stride_out, R, XOFF, HIDDEN, eps,
                               S, S_XA, BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr, GEMMA: tl.constexpr,
                               BLOCK_R: tl.constexpr, SP: tl.constexpr, SP_XA: tl.constexpr, SPLIT: tl.constexpr,
                               USE_PDL: tl.constexpr):
    """Program (row, part) computes s for its BLOCK columns. SPLIT: the row spans several programs; each takes a
    ticket from the row's counter after storing its s, and the one that takes the last ticket reads the whole row
    of s back (L2), normalises it and resets the counter to 0 for the next launch."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < HIDDEN
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)  # the norm weight and the adapters' B^T, which no kernel writes,
    if BLOCK_R > 1:  # before the wait
        bt = _bt_tile(bt_ptr, cols, ok, R, stride_bt, BLOCK_R)
    pdl_wait(USE_PDL)
    a = _partials(y_ptr + row * stride_y, cols, ok, stride_ys, S, SP)
    if BLOCK_R > 1:
        xa = _xa_tile(xa_ptr + row * stride_xa + XOFF, stride_xas, S_XA, R, BLOCK_R, SP_XA)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    a = _total(a)
    if BLOCK_R > 1:
        a += _adapter_term(xa, bt)
    ty = s_ptr.dtype.element_ty
    a = a.to(ty).to(tl.float32)
    s = (x.to(tl.float32) + a).to(ty)
    s_row = s_ptr + row * stride_s
    tl.store(s_row + cols, s, mask=ok)
    if SPLIT:
        # the weights wait in out (the last program overwrites them): loaded here with everything else, they are in
        # L2 when the last program reads the row's weights, instead of in DRAM behind the ticket
        tl.store(out_ptr + row * stride_out + cols, w, mask=ok)
        tl.debug_barrier()  # every thread's stores of s happen before the ticket (whose release publishes them)
        ticket = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:  # the row's other programs have all stored their s
            every = tl.arange(0, ROW_BLOCK)
            every_ok = every < HIDDEN
            whole = tl.load(s_row + every, mask=every_ok, other=0.0, cache_modifier=".cg")
            w_all = tl.load(w_ptr + every, mask=every_ok, other=0.0)
            tl.store(count_ptr + row, 0)
            _rms_norm_store(whole.to(tl.float32), w_all, every, every_ok, out_ptr + row * stride_out, HIDDEN, eps,
                            GEMMA)
    else:
        _rms_norm_store(s.to(tl.float32), w, cols, ok, out_ptr + row * stride_out, HIDDEN, eps, GEMMA)


# ---------------------------------------------------------------- launchers (the ops' bodies)
def _splits(t):
    """A [S, M, N] tensor as it is, a [M, N] one as [1, M, N]: (tensor, S, split stride, row stride)."""
    t = t if t.dim() == 3 else t[None]
    return t, t.shape[0], t.stride(0), t.stride(1)


def _lora_args(y, xa, lora_bt):
    """(xa, S_XA, split stride, row stride, bt, R, bt stride, BLOCK_R); BLOCK_R 1 means no adapter (y stands in
    for the pointers)."""
    if xa is None:
        return y, 1, 0, 0, y, 0, 0, 1
    xa, s, sxs, sxr = _splits(xa)
    r = lora_bt.shape[0]
    return xa, s, sxs, sxr, lora_bt, r, lora_bt.stride(0), max(2, next_pow2(r))


def _launch_qkv(y, xa, lora_bt, xa_offsets, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim, config=None):
    """config (BLOCK_HALF, num_warps): a program rotates BLOCK_HALF pairs of a head (a whole head when BLOCK_HALF
    >= head_dim / 2), default QKV_CONFIG."""
    y, s, sys_, syr = _splits(y)
    b = y.shape[1]
    q = torch.empty(b, n_heads * head_dim, dtype=k_cache.dtype, device=y.device)
    xa_, s_xa, sxs, sxr, bt, r, sbt, block_r = _lora_args(y, xa, lora_bt)
    half = head_dim // 2
    block_half, warps = config or QKV_CONFIG
    block_half = min(next_pow2(block_half), next_pow2(half))
    _qkv_rope_cache_kernel[(b, n_heads + 2 * n_kv, -(-half // block_half))](
        y, xa_, bt, cos, sin, pos, q, k_cache, v_cache, sys_, syr, sxs, sxr, sbt, cos.stride(0), q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), r, *xa_offsets[:3], s, s_xa, H=n_heads, KV=n_kv,
        HALF=half, BLOCK_HALF=block_half, BLOCK_R=block_r, SP=next_pow2(s), SP_XA=next_pow2(s_xa), num_warps=warps,
        USE_PDL=pdl_mode(y.device), **pdl_launch(pdl_mode(y.device)))
    return q


def _launch_act(y, xa, lora_bt, xa_offsets, inter, act, dtype, config=None):
    """config (BLOCK columns of gate and of up per program, num_warps), default ACT_CONFIG."""
    y, s, sys_, syr = _splits(y)
    b = y.shape[1]
    h = torch.empty(b, inter, dtype=dtype, device=y.device)
    xa_, s_xa, sxs, sxr, bt, r, sbt, block_r = _lora_args(y, xa, lora_bt)
    block, warps = config or ACT_CONFIG
    block = min(next_pow2(block), next_pow2(inter))
    _lora_act_mul_kernel[(b, -(-inter // block))](y, xa_, bt, h, sys_, syr, sxs, sxr, sbt, h.stride(0), r, inter,
                                                  *xa_offsets[:2], s, s_xa, ACT=act, BLOCK=block, BLOCK_R=block_r,
                                                  SP=next_pow2(s), SP_XA=next_pow2(s_xa), num_warps=warps,
                                                  USE_PDL=pdl_mode(y.device), **pdl_launch(pdl_mode(y.device)))
    return h


# per-row ticket counters of the split residual norm, one zeroed int32 buffer per device (see `row_counters`)
_COUNTERS: dict[str, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers: CUDA graphs captured with them still point at them


def row_counters(device: torch.device, rows: int) -> torch.Tensor:
    """The zeroed int32 ticket counters (>= `rows`) that `lora_residual_norm` uses when a row spans several programs;
    each launch leaves them zeroed again. Launches sharing them must be stream-ordered (one stream, or streams that
    wait on each other: CUDA graphs replayed on one stream are). Allocated on first use and grown (the old buffer
    is kept alive for graphs captured with it); a call inside a CUDA graph capture cannot allocate, so call this
    (or run the step once eagerly, as the engine does) before capturing."""
    device = torch.device(device)
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= rows:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise UnsupportedFeatureError(
            f"lora_residual_norm needs ticket counters for {rows} rows on {key}, and this call is inside a CUDA "
            f"graph capture, where they cannot be allocated (they have {0 if buf is None else buf.numel()} rows). "
            f"Fix: run the step once eagerly before capturing it, or call "
            f"fastlm.kernels.decode_epilogue.row_counters(device, rows) first.")
    if buf is not None:
        _RETIRED.append(buf)
    buf = torch.zeros(max(rows, 256), dtype=torch.int32, device=device)
    _COUNTERS[key] = buf
    return buf


def _launch_norm(x, y, xa, lora_bt, xa_offsets, weight, eps, gemma, config=None):
    """config (BLOCK, num_warps): BLOCK columns per program (next_pow2(hidden) or more: one program per row),
    default NORM_CONFIG."""
    b, hidden = x.shape
    y, s_y, sys_, syr = _splits(y)
    s = torch.empty_like(x)
    out = torch.empty_like(x)
    xa_, s_xa, sxs, sxr, bt, r, sbt, block_r = _lora_args(y, xa, lora_bt)
    row_block = next_pow2(hidden)
    block, warps = config or ((row_block, NORM_ROW_WARPS) if xa is None and s_y == 1 else NORM_CONFIG)
    block = min(next_pow2(block), row_block)
    parts = -(-hidden // block)
    counters = row_counters(x.device, b) if parts > 1 else s
    _lora_residual_norm_kernel[(b, parts)](x, y, xa_, bt, weight, s, out, counters, x.stride(0), sys_, syr, sxs, sxr,
                                           sbt, s.stride(0), out.stride(0), r, xa_offsets[0], hidden, eps, s_y, s_xa,
                                           BLOCK=block, ROW_BLOCK=row_block, GEMMA=gemma, BLOCK_R=block_r,
                                           SP=next_pow2(s_y), SP_XA=next_pow2(s_xa), SPLIT=parts > 1, num_warps=warps,
                                           USE_PDL=pdl_mode(x.device), **pdl_launch(pdl_mode(x.device)))
    return s, out


def _qkv_impl(y: torch.Tensor, xa: Optional[torch.Tensor], lora_bt: Optional[torch.Tensor], xa_offsets: list[int],
              cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    return sys.modules[__name__]._launch_qkv(y, xa, lora_bt, xa_offsets, cos, sin, pos, k_cache, v_cache, n_heads,
                                             n_kv, head_dim)


def _qkv_fake(y, xa, lora_bt, xa_offsets, cos, sin, pos, k_cache, v_cache, n_heads, n_kv, head_dim):
    return y.new_empty(y.shape[-2], n_heads * head_dim, dtype=k_cache.dtype)


def _act_impl(y: torch.Tensor, xa: Optional[torch.Tensor], lora_bt: Optional[torch.Tensor], xa_offsets: list[int],
              inter: int, act: int, dtype: torch.dtype) -> torch.Tensor:
    return sys.modules[__name__]._launch_act(y, xa, lora_bt, xa_offsets, inter, act, dtype)


def _act_fake(y, xa, lora_bt, xa_offsets, inter, act, dtype):
    return y.new_empty(y.shape[-2], inter, dtype=dtype)


def _norm_impl(x: torch.Tensor, y: torch.Tensor, xa: Optional[torch.Tensor], lora_bt: Optional[torch.Tensor],
               xa_offsets: list[int], weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return sys.modules[__name__]._launch_norm(x, y, xa, lora_bt, xa_offsets, weight, eps, gemma)


def _norm_fake(x, y, xa, lora_bt, xa_offsets, weight, eps, gemma):
    return torch.empty_like(x), torch.empty_like(x)


if HAS_TRITON:
    register_opaque_op("qkv_rope_cache", _qkv_impl, _qkv_fake, mutates=("k_cache", "v_cache"))
    register_opaque_op("lora_act_mul", _act_impl, _act_fake)
    register_opaque_op("lora_residual_norm", _norm_impl, _norm_fake)


# ---------------------------------------------------------------- the ops (`lora`: see the module docstring)
def qkv_rope_cache(y, xa, lora, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int, head_dim: int):
    """See the module docstring. y/xa rows may be strided views (xa as the last columns of y); pos [B] long."""
    bt, offsets = _adapter_parts(lora, 3)
    return torch.ops.fastlm.qkv_rope_cache(y, xa, bt, offsets, cos, sin, pos, k_cache, v_cache, n_heads, n_kv,
                                           head_dim)


def lora_act_mul(y, xa, lora, inter: int, act: int, dtype: torch.dtype | None = None):
    """dtype: of the output (the activations'); default y's (y may be fp32 partial sums)."""
    bt, offsets = _adapter_parts(lora, 2)
    return torch.ops.fastlm.lora_act_mul(y, xa, bt, offsets, inter, act, dtype or y.dtype)


def lora_residual_norm(x, y, xa, lora, weight, eps: float, gemma: bool):
    bt, offsets = _adapter_parts(lora, 1)
    return torch.ops.fastlm.lora_residual_norm(x, y, xa, bt, offsets, weight, float(eps), bool(gemma))
