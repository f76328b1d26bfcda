"""One-query attention over a static KV cache, for the engine's decode step: one launch per layer.

    decode_attention(q [B, H, 1, D], k_cache [S, KV, L, D], v_cache, positions [B], scaling, softcap, window)
        -> [B, 1, H * D]

Row b reads cache slot b. Key j is seen by the query at position p when j <= p (and j > p - window on sliding
layers); scores are scaled, then soft-capped (`cap * tanh(s / cap)`, Gemma 2) before the softmax. Each program
takes one (row, kv head) pair and all of its query heads (GQA), walks only the allowed keys in blocks with an
online softmax in fp32, and writes the heads' outputs side by side, ready for the o projection. The matmul
version a prefill uses (`decode_attention_reference`) is the reference.
"""
from __future__ import annotations

import sys

import torch

from ._triton import jit, next_pow2, register_opaque_op, tl, use_triton


def decode_attention_reference(q, k_cache, v_cache, positions, scaling: float, softcap: float | None = None,
                               window: int | None = None) -> torch.Tensor:
    b, h, _, d = q.shape
    kv = k_cache.shape[1]
    g = h // kv
    k, v = k_cache[:b].float(), v_cache[:b].float()
    qg = q.float().reshape(b, kv, g, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scaling  # [B, kv, g, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(k.shape[2], device=q.device)
    allowed = key_pos[None, :] <= positions[:, None]
    if window is not None:
        allowed = allowed & (key_pos[None, :] > positions[:, None] - window)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, kv, g, D]
    return out.reshape(b, 1, h * d).to(q.dtype)


@jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, stride_qb, stride_qh, stride_kb, stride_kh,
                             stride_kl, L, scaling, softcap, window, G: tl.constexpr, BLOCK_G: tl.constexpr,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                             HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    pos = tl.load(pos_ptr + b).to(tl.int32)
    gi = tl.arange(0, BLOCK_G)
    di = tl.arange(0, BLOCK_D)
    g_ok = gi < G
    d_ok = di < D
    heads = kvh * G + gi
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + di[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    hi = tl.minimum(pos + 1, L)
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
    else:
        lo = pos * 0
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    base = b.to(tl.int64) * stride_kb + kvh * stride_kh
    for start in range((lo // BLOCK_L) * BLOCK_L, hi, BLOCK_L):
        li = start + tl.arange(0, BLOCK_L)
        l_ok = (li < hi) & (li >= lo)
        offs = base + li[:, None].to(tl.int64) * stride_kl + di[None, :]
        kmask = l_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scaling  # [BLOCK_G, BLOCK_L]
        if HAS_SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(l_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * (G * tl.num_programs(1) * D) + heads[:, None] * D + di[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def decode_attention(q, k_cache, v_cache, positions, scaling: float, softcap: float | None = None,
                     window: int | None = None) -> torch.Tensor:
    """See the module docstring. q [B, H, 1, D] (last dim contiguous), caches [S >= B, KV, L, D] contiguous,
    positions [B] long (each row's query position, already written into the cache)."""
    b, h, t, d = q.shape
    kv = k_cache.shape[1]
    if (t != 1 or h % kv or q.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or not use_triton(q, k_cache, v_cache)):
        return decode_attention_reference(q, k_cache, v_cache, positions, scaling, softcap, window)
    # an opaque op for torch.compile: inductor calls it as it is (the launch that eager mode makes) instead of
    # re-compiling the Triton kernel inside its own graph
    return torch.ops.fastlm.decode_attention(q, k_cache, v_cache, positions, float(scaling), float(softcap or 0.0),
                                             int(window or 0))


def _op_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
             scaling: float, softcap: float, window: int) -> torch.Tensor:
    return sys.modules[__name__]._launch(q, k_cache, v_cache, positions, scaling, softcap or None, window or None)


def _op_fake(q, k_cache, v_cache, positions, scaling, softcap, window):
    b, h, _, d = q.shape
    return q.new_empty(b, 1, h * d)


register_opaque_op("decode_attention", _op_impl, _op_fake)


def _launch(q, k_cache, v_cache, positions, scaling, softcap, window):
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # no copy for the engine's caches
    b, h, t, d = q.shape
    kv = k_cache.shape[1]
    g = h // kv
    out = torch.empty(b, 1, h * d, dtype=q.dtype, device=q.device)
    block_g = next_pow2(g)
    block_l = 32 if block_g <= 4 else 16
    _decode_attention_kernel[(b, kv)](
        q, k_cache, v_cache, positions, out, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), k_cache.shape[2], float(scaling), float(softcap or 1.0), int(window or 0), G=g,
        BLOCK_G=block_g, D=d, BLOCK_D=next_pow2(d), BLOCK_L=block_l,
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, num_warps=4)
    return out
