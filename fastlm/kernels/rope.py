"""Rotary position embedding on Q and K in one launch, forward and backward, in Triton.

`apply_rope(q, k, cos, sin)` matches transformers' `apply_rotary_pos_emb` (rotate-half layout) with the `cos`,
`sin` that the model's rotary module computes from position_ids: shape (b, s, rot) or (1, s, rot), already carrying
every RoPE scaling (default, linear, llama3, dynamic, yarn with its attention factor, longrope). Because cos/sin are
per token, packed sequences with per-sequence position_ids work. rot < head_dim is Phi-3's partial rotary: the last
head_dim - rot dims pass through. q: (b, hq, s, d), k: (b, hkv, s, d) with any hq, hkv (GQA).

Out of place: q and k are views of the projection outputs, which autograd and gradient checkpointing may still
hold, so the kernel writes new tensors (same strides as q and k) instead of rotating them in place; the cost is one
transient q/k-sized buffer. The backward is the same rotation by -sin and needs nothing saved but cos and sin.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, Problem
from ._triton import device_guard, jit, next_pow2, tl, use_triton
from .reference import apply_rope_reference


@jit
def _rotate_heads(X, XO, sxb, sxh, sxs, sob, soh, sos, b, s, n_heads, c1, c2, s1, s2, half, rot, head_dim,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_PASS: tl.constexpr,
                  BLOCK_PASS: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (dims < half)[None, :]
    x_base = X + b * sxb + s * sxs + heads[:, None] * sxh
    o_base = XO + b * sob + s * sos + heads[:, None] * soh
    x1 = tl.load(x_base + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + half + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(o_base + dims[None, :], y1.to(XO.dtype.element_ty), mask=mask)
    tl.store(o_base + half + dims[None, :], y2.to(XO.dtype.element_ty), mask=mask)
    if HAS_PASS:
        pdims = rot + tl.arange(0, BLOCK_PASS)
        pmask = (heads < n_heads)[:, None] & (pdims < head_dim)[None, :]
        xp = tl.load(x_base + pdims[None, :], mask=pmask, other=0.0)
        tl.store(o_base + pdims[None, :], xp, mask=pmask)


@jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, sqb, sqh, sqs, skb, skh, sks, sqob, sqoh, sqos, skob, skoh, skos,
                 scb, scs, ssb, sss, seq_len, n_qh, n_kh, half, rot, head_dim, BACKWARD: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_PASS: tl.constexpr,
                 BLOCK_PASS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < half
    c_base = COS + b * scb + s * scs
    s_base = SIN + b * ssb + s * sss
    c1 = tl.load(c_base + dims, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_base + half + dims, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_base + dims, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + half + dims, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        # transpose of the rotation: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1
        s_tmp = s1
        s1 = -s2
        s2 = -s_tmp
    _rotate_heads(Q, QO, sqb, sqh, sqs, sqob, sqoh, sqos, b, s, n_qh, c1, c2, s1, s2, half, rot, head_dim,
                  BLOCK_H, BLOCK_HALF, HAS_PASS, BLOCK_PASS)
    _rotate_heads(K, KO, skb, skh, sks, skob, skoh, skos, b, s, n_kh, c1, c2, s1, s2, half, rot, head_dim,
                  BLOCK_H, BLOCK_HALF, HAS_PASS, BLOCK_PASS)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False):
    """Rotate q (b, hq, s, d) and k (b, hkv, s, d) into new tensors; backward=True rotates by -sin (the gradient)."""
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    batch, n_qh, seq_len, head_dim = q.shape
    n_kh = k.shape[1]
    rot = cos.shape[-1]
    half = rot // 2
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    ssb = sin.stride(0) if sin.shape[0] > 1 else 0
    block_h = next_pow2(max(n_qh, n_kh))
    block_half = next_pow2(half)
    with device_guard(q):
        _rope_kernel[(batch * seq_len,)](
            q, k, cos, sin, qo, ko, *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
            scb, cos.stride(1), ssb, sin.stride(1), seq_len, n_qh, n_kh, half, rot, head_dim, BACKWARD=backward,
            BLOCK_H=block_h, BLOCK_HALF=block_half, HAS_PASS=rot < head_dim,
            BLOCK_PASS=next_pow2(max(1, head_dim - rot)), num_warps=4 if block_h * block_half <= 2048 else 8)
    return qo, ko


class RopeFunction(torch.autograd.Function):
    """(q, k) -> (q rotated, k rotated); saves only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.q_shape_dtype, ctx.k_shape_dtype = (q.shape, q.dtype), (k.shape, k.dtype)
        return rope_launch(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        if dq is None:
            dq = torch.zeros(ctx.q_shape_dtype[0], dtype=ctx.q_shape_dtype[1], device=cos.device)
        if dk is None:
            dk = torch.zeros(ctx.k_shape_dtype[0], dtype=ctx.k_shape_dtype[1], device=cos.device)
        dq_in, dk_in = rope_launch(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def _check(q, k, cos, sin) -> None:
    problems = []
    if q.dim() != 4 or k.dim() != 4:
        problems.append(Problem("q/k dims", (q.dim(), k.dim()), "4-D (b, heads, s, head_dim)",
                                "pass q and k after view(...).transpose(1, 2), or use unsqueeze_dim=2"))
    elif q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        problems.append(Problem("k.shape", tuple(k.shape), f"same batch, seq and head_dim as q {tuple(q.shape)}",
                                "pass q and k of the same attention call"))
    if cos.shape != sin.shape or cos.dim() != 3:
        problems.append(Problem("cos.shape/sin.shape", (tuple(cos.shape), tuple(sin.shape)),
                                "equal, (b or 1, s, rot)", "pass the (cos, sin) the model's rotary module returned"))
    elif q.dim() == 4:
        rot = cos.shape[-1]
        if rot % 2 or rot > q.shape[-1] or cos.shape[1] != q.shape[2] or cos.shape[0] not in (1, q.shape[0]):
            problems.append(Problem("cos.shape", tuple(cos.shape),
                                    f"(1 or {q.shape[0]}, {q.shape[2]}, even rot <= {q.shape[-1]})",
                                    "pass cos/sin computed for these position_ids"))
    if problems:
        raise ConfigError("apply_rope", problems)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (rotate-half, partial rotary) on q and k; Triton on CUDA.

    q: (b, hq, s, d), k: (b, hkv, s, d) for unsqueeze_dim=1, or (b, s, h, d) for unsqueeze_dim=2.
    cos, sin: (b or 1, s, rot) with rot <= d. Returns new (q_embed, k_embed) of the input shapes.
    cos/sin that require grad run the torch reference (the kernel gives them no gradient).
    """
    if unsqueeze_dim not in (1, 2):
        raise ConfigError("apply_rope", [Problem("unsqueeze_dim", unsqueeze_dim, "1 (b, h, s, d) or 2 (b, s, h, d)",
                                                 "pass the head axis of q and k")])
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if unsqueeze_dim == 2:
        qo, ko = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    _check(q, k, cos, sin)
    needs_cos_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if needs_cos_grad or not use_triton(q, k, cos, sin):
        return apply_rope_reference(q, k, cos, sin, 1)
    return RopeFunction.apply(q, k, cos, sin)
