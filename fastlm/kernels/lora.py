"""Fused LoRA projections: Y = X·Wᵀ (+ b) + s·(X·Aᵀ)·Bᵀ with a hand-derived backward.

Shapes: X (..., in); frozen base W (out, in) dense or bitsandbytes 4-bit; optional frozen bias (out,);
adapter A (r, in), B (out, r); scale s (float). Backward, with G = dY:
    dX = G·W + s·(G·B)·A,   dA = s·(G·B)ᵀ·X,   dB = s·Gᵀ·(X·Aᵀ).
No gradient for W or the bias (frozen). Saved per projection: X and X·Aᵀ (N × r); 4-bit weights are dequantized
again in the backward instead of being saved dense.

- `LoRALinearFunction` / `LoRAQKVFunction`: k projections of one input (o_proj: 1; q/k/v: 3). The adapters' A
  matrices are stacked so X·Aᵀ is one GEMM for all k, and so is the LoRA part of dX.
- `LoRAMLPFunction`: down(act(gate(X)) * up(X)) with LoRA on all three, act one of ACTIVATIONS (SwiGLU, GeGLU with
  erf or tanh GELU). Saves X, gate, up and the three N × r products; act(gate) * up is recomputed in the backward
  (one elementwise pass) rather than saved, and the backward reuses its buffer for dL/dh.

Dtypes: everything runs in the compute dtype, X's dtype (or the autocast dtype when autocast is on), with A and B
cast to it. PEFT instead runs the LoRA branch in the adapters' dtype (fp32 when it autocasts the adapters), which
keeps an fp32 copy of X alive per projection; in fp32 both are the same computation, in 16-bit the difference is
one 16-bit rounding of the small LoRA terms (tests/kernels/test_fused_lora.py measures it). Gradients of A and B
come back in the adapters' dtype.
Activations run as Triton kernels on CUDA tensors and as torch ops elsewhere.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .nf4_dequant import dequantize_nf4

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    HAS_TRITON = False

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_FORCE_TRITON = [False]


class BaseWeight(NamedTuple):
    """A frozen base projection: `weight` (out, in) dense, or a bitsandbytes 4-bit packed weight with its
    `quant_state`; `bias` (out,) or None."""

    weight: torch.Tensor
    quant_state: object = None
    bias: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant_state is None:
            return self.weight.to(dtype)
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense(x.dtype), bias)


class Adapter(NamedTuple):
    """One LoRA adapter on a projection: A (r, in), B (out, r), scale s."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


@contextmanager
def force_triton(on: bool = True):
    """Run the activation kernels on CPU tensors too (tests, with TRITON_INTERPRET=1 set before import)."""
    old = _FORCE_TRITON[0]
    _FORCE_TRITON[0] = on
    try:
        yield
    finally:
        _FORCE_TRITON[0] = old


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or _FORCE_TRITON[0])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# ----------------------------------------------------------------------------------------------- activations
def _act_torch(g: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if kind == "gelu_tanh" else "none")


def _act_and_grad_torch(g: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(g) and act'(g), in fp32 (fp64 stays fp64)."""
    g = g if g.dtype == torch.float64 else g.float()
    if kind == "silu":
        sig = torch.sigmoid(g)
        return g * sig, sig * (1 + g * (1 - sig))
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(g * (1 / math.sqrt(2))))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (g + 0.044715 * g * g * g))
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * 0.044715 * g * g)


if HAS_TRITON:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        if ACT == 0:  # silu; the sigmoid from exp(-|g|), which cannot overflow
            e = tl.exp(-tl.abs(g))
            sig = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            a = g * sig
            da = sig * (1.0 + g * (1.0 - sig))
        elif ACT == 1:  # gelu (erf)
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            a = g * cdf
            da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        else:  # gelu, tanh approximation; tanh(z) = sign(z) (1 - e) / (1 + e) with e = exp(-2|z|)
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            e = tl.exp(-2.0 * tl.abs(z))
            t = (1.0 - e) / (1.0 + e)
            t = tl.where(z >= 0, t, -t)
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        return a, da

    @triton.jit
    def _act_mul_forward_kernel(g_ptr, u_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT)
        tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _act_mul_backward_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        """dg / du may alias g / u (or dh): every element is read before it is written, by the same program."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        tl.store(du_ptr + offs, (dh * a).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offs, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def act_mul(g: torch.Tensor, u: torch.Tensor, kind: str) -> torch.Tensor:
    """h = act(g) * u (no autograd). g, u: same shape, contiguous."""
    if not _use_triton(g):
        return _act_torch(g, kind) * u
    h = torch.empty_like(g)
    n = g.numel()
    _act_mul_forward_kernel[(triton.cdiv(n, _BLOCK),)](g, u, h, n, ACT=ACTIVATIONS.index(kind), BLOCK=_BLOCK)
    return h


def act_mul_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, kind: str, overwrite: bool = False):
    """(dg, du) of h = act(g) * u. dh is consumed (dg is written into its buffer); with `overwrite`, g and u are
    consumed too (dg and du are written into their buffers, and dh is left as it was)."""
    dg_out, du_out = (g, u) if overwrite else (dh, torch.empty_like(u))
    if not _use_triton(g):
        a, da = _act_and_grad_torch(g, kind)
        dg = dh * u * da
        du_out.copy_(dh * a)
        return dg_out.copy_(dg), du_out
    n = g.numel()
    _act_mul_backward_kernel[(triton.cdiv(n, _BLOCK),)](g, u, dh, dg_out, du_out, n, ACT=ACTIVATIONS.index(kind),
                                                        BLOCK=_BLOCK)
    return dg_out, du_out


# ----------------------------------------------------------------------------------------------- projections
def _project(x, base: BaseWeight, xa, B, scale):
    """x·Wᵀ + b + s·xa·Bᵀ in x's dtype; xa: (N, r) slice of the stacked X·Aᵀ."""
    out = base.linear(x)
    return out.addmm_(xa, B.t(), alpha=scale)


def _shared_input_backward(x, xa, grads, bases, As, Bs, scales, need_x, need_a, need_b):
    """Backward of k projections of one input x (N, in). grads: k tensors (N, out_i) in x's dtype;
    xa: (N, Σr) = x·[A_1; …; A_k]ᵀ. Returns dx (or None), [dA_i], [dB_i] (None where not needed)."""
    ranks = [a.shape[0] for a in As]
    scaled = torch.cat([g @ (B * s) for g, B, s in zip(grads, Bs, scales)], dim=1)  # s_i·G_i·B_i side by side
    dx = None
    if need_x:
        for g, base in zip(grads, bases):
            w = base.dense(x.dtype)
            dx = g @ w if dx is None else dx.addmm_(g, w)
            del w
        dx.addmm_(scaled, _stack(As))
    dAs, dBs = [None] * len(As), [None] * len(As)
    if any(need_a):
        dA = scaled.t() @ x
        dAs = [d if n else None for d, n in zip(dA.split(ranks, dim=0), need_a)]
    cols = 0
    for i, (g, s, r) in enumerate(zip(grads, scales, ranks)):
        if need_b[i]:
            dBs[i] = (g.t() @ xa[:, cols:cols + r]).mul_(s)
        cols += r
    return dx, dAs, dBs


def _stack(As) -> torch.Tensor:
    """[A_1; …; A_k] (Σr, in); no copy for one adapter."""
    return As[0] if len(As) == 1 else torch.cat(As, dim=0)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class LoRAProjectionsFunction(torch.autograd.Function):
    """k LoRA projections of one input. apply(x, bases, scales, A_1, B_1, …, A_k, B_k) -> tuple of k outputs
    (..., out_i) in the compute dtype."""

    @staticmethod
    def forward(ctx, x, bases, scales, *adapters):
        cdtype = compute_dtype(x)
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            xc = _flat(x).to(cdtype)
            As = [a.to(cdtype) for a in adapters[0::2]]
            Bs = [b.to(cdtype) for b in adapters[1::2]]
            xa = xc @ _stack(As).t()
            outs, cols = [], 0
            for base, A, B, s in zip(bases, As, Bs, scales):
                r = A.shape[0]
                outs.append(_project(xc, base, xa[:, cols:cols + r], B, s).reshape(*shape[:-1], -1))
                cols += r
        ctx.bases, ctx.scales, ctx.x_dtype = bases, scales, x.dtype
        ctx.save_for_backward(xc, xa, *adapters)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        xc, xa, *adapters = ctx.saved_tensors
        As_in, Bs_in = adapters[0::2], adapters[1::2]
        need = ctx.needs_input_grad
        with torch.autocast(xc.device.type, enabled=False):
            cdtype = xc.dtype
            gs = [_flat(g).to(cdtype) for g in grads]
            dx, dAs, dBs = _shared_input_backward(
                xc, xa, gs, ctx.bases, [a.to(cdtype) for a in As_in], [b.to(cdtype) for b in Bs_in], ctx.scales,
                need[0], list(need[3::2]), list(need[4::2]))
        if dx is not None:
            dx = dx.reshape(*grads[0].shape[:-1], -1).to(ctx.x_dtype)
        out = []
        for dA, dB, A, B in zip(dAs, dBs, As_in, Bs_in):
            out += [None if dA is None else dA.to(A.dtype), None if dB is None else dB.to(B.dtype)]
        return (dx, None, None, *out)


class LoRALinearFunction(LoRAProjectionsFunction):
    """One projection (o_proj, or any single LoRA linear)."""


class LoRAQKVFunction(LoRAProjectionsFunction):
    """q, k and v projections of the same hidden states."""


def fused_lora_linear(x: torch.Tensor, base: BaseWeight, adapter: Adapter) -> torch.Tensor:
    (out,) = LoRALinearFunction.apply(x, (base,), (float(adapter.scale),), adapter.A, adapter.B)
    return out


def fused_lora_qkv(x: torch.Tensor, bases, adapters):
    """bases, adapters: three each (q, k, v). Returns (q, k, v), each (..., out_i)."""
    flat = [t for a in adapters for t in (a.A, a.B)]
    return LoRAQKVFunction.apply(x, tuple(bases), tuple(float(a.scale) for a in adapters), *flat)


# The MLP backward writes dg and du over its saved g and u: it then holds three [tokens, intermediate] tensors at
# most instead of four, the largest ones of a layer's backward (the 1B bench's peak, 4 x 2048 tokens, fell from 3.40
# to 3.263 GB on an H100). The graph's backward can then run once; set False before the forward for a second one
# (retain_graph=True, gradcheck).
OVERWRITE_SAVED = True


class LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)), LoRA on each. apply(x, (gate, up, down) BaseWeights, (s_g, s_u, s_d),
    activation, A_g, B_g, A_u, B_u, A_d, B_d) -> (..., hidden)."""

    @staticmethod
    def forward(ctx, x, bases, scales, activation, Ag, Bg, Au, Bu, Ad, Bd):
        cdtype = compute_dtype(x)
        shape = x.shape
        gate, up, down = bases
        with torch.autocast(x.device.type, enabled=False):
            xc = _flat(x).to(cdtype)
            Ag_c, Bg_c, Au_c, Bu_c, Ad_c, Bd_c = (t.to(cdtype) for t in (Ag, Bg, Au, Bu, Ad, Bd))
            rg = Ag.shape[0]
            xa = xc @ torch.cat((Ag_c, Au_c), dim=0).t()
            g = _project(xc, gate, xa[:, :rg], Bg_c, scales[0])
            u = _project(xc, up, xa[:, rg:], Bu_c, scales[1])
            h = act_mul(g, u, activation)
            ha = h @ Ad_c.t()
            out = _project(h, down, ha, Bd_c, scales[2])
        ctx.bases, ctx.scales, ctx.activation, ctx.x_dtype = bases, scales, activation, x.dtype
        ctx.overwrite, ctx.spent = OVERWRITE_SAVED, False
        ctx.save_for_backward(xc, xa, g, u, ha, Ag, Bg, Au, Bu, Ad, Bd)
        return out.reshape(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.spent:
            raise RuntimeError("fastlm's fused LoRA MLP backward reuses the memory of its saved activations, so it "
                               "runs once per forward. Fix: set fastlm.kernels.lora.OVERWRITE_SAVED = False before "
                               "the forward whose graph is backpropagated twice (retain_graph=True)")
        xc, xa, g, u, ha, Ag, Bg, Au, Bu, Ad, Bd = ctx.saved_tensors
        need = ctx.needs_input_grad
        gate, up, down = ctx.bases
        s_g, s_u, s_d = ctx.scales
        with torch.autocast(xc.device.type, enabled=False):
            cdtype = xc.dtype
            Ag_c, Bg_c, Au_c, Bu_c, Ad_c, Bd_c = (t.to(cdtype) for t in (Ag, Bg, Au, Bu, Ad, Bd))
            go = _flat(grad).to(cdtype)
            gb = (go @ Bd_c).mul_(s_d)  # s·G·B_d, (N, r_d)
            dBd = (go.t() @ ha).mul_(s_d) if need[9] else None
            h = act_mul(g, u, ctx.activation) if need[8] else torch.empty_like(g)
            dAd = gb.t() @ h if need[8] else None
            wd = down.dense(cdtype)
            dh = torch.mm(go, wd, out=h)  # h is dead: its buffer takes dL/dh
            del wd, h
            dh.addmm_(gb, Ad_c)
            dg, du = act_mul_backward(g, u, dh, ctx.activation, overwrite=ctx.overwrite)
            ctx.spent = ctx.overwrite
            del dh, g, u
            dx, (dAg, dAu), (dBg, dBu) = _shared_input_backward(
                xc, xa, [dg, du], [gate, up], [Ag_c, Au_c], [Bg_c, Bu_c], [s_g, s_u], need[0],
                [need[4], need[6]], [need[5], need[7]])
        if dx is not None:
            dx = dx.reshape(*grad.shape[:-1], -1).to(ctx.x_dtype)
        cast = [None if d is None else d.to(p.dtype) for d, p in
                zip((dAg, dBg, dAu, dBu, dAd, dBd), (Ag, Bg, Au, Bu, Ad, Bd))]
        return (dx, None, None, None, *cast)


def fused_lora_mlp(x: torch.Tensor, gate: BaseWeight, up: BaseWeight, down: BaseWeight,
                   adapters: tuple[Adapter, Adapter, Adapter], activation: str) -> torch.Tensor:
    """x: (..., hidden) -> (..., hidden). adapters: (gate, up, down)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: one of {ACTIVATIONS} is supported. Fix: use the plain PEFT "
                         "MLP forward for other activations")
    flat = [t for a in adapters for t in (a.A, a.B)]
    return LoRAMLPFunction.apply(x, (gate, up, down), tuple(float(a.scale) for a in adapters), activation, *flat)
