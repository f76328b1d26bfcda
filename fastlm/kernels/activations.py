"""Gated MLP activations in Triton: SwiGLU `silu(g) * u` and GeGLU `gelu(g) * u` (exact erf or tanh approximation).

`swiglu(g, u)` matches `ACT2FN["silu"](gate_proj(x)) * up_proj(x)` (Llama, Mistral, Qwen); `geglu(g, u, "tanh")`
matches `ACT2FN["gelu_pytorch_tanh"]` (Gemma) and `geglu(g, u, "none")` matches `ACT2FN["gelu"]`. Both compute in
fp32 and round once.

Memory: only g and u are saved (the MLP keeps them anyway); the backward recomputes the activation from them. With
`inplace_backward=True` the backward writes dg into g's storage and du into u's, so no new gate/up-sized buffers are
allocated; use it only when nothing else reads g or u after this op (true of the MLP's own gate/up projections,
whose autograd nodes save their inputs, not their outputs). The backward bumps g's and u's autograd version, so
any other node that saved them raises instead of reading gradients.
"""
from __future__ import annotations

import torch
from torch.autograd.graph import increment_version

from ..errors import ConfigError, Problem
from ._triton import device_guard, jit, tl, triton, use_triton
from .reference import GELU_APPROXIMATIONS, geglu_reference, swiglu_reference

SILU, GELU_ERF, GELU_TANH = 0, 1, 2
BLOCK = 1024


@jit
def _tanh(x):
    # tanh saturates to +-1 in fp32 well before |x| = 15; the clamp keeps exp() finite
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))  # 1/sqrt(2)
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1/sqrt(2*pi)
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi)
        t = _tanh(inner)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@jit
def _gated_fwd_kernel(G, U, H, sg, su, sh, n_cols, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(H + row * sh + cols, (a * u).to(H.dtype.element_ty), mask=mask)


@jit
def _gated_bwd_kernel(DH, G, U, DG, DU, sdh, sg, su, sdg, sdu, n_cols, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(DH + row * sdh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DG + row * sdg + cols, (dh * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * sdu + cols, (dh * a).to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) view with unit last stride; chunks of a fused gate_up keep their row stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.contiguous().view(-1, t.shape[-1])


def gated_forward(g: torch.Tensor, u: torch.Tensor, act: int) -> torch.Tensor:
    g2, u2 = _rows(g), _rows(u)
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    h2 = h.view(-1, g.shape[-1])
    n_rows, n_cols = g2.shape
    if n_rows and n_cols:
        with device_guard(g2):
            _gated_fwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](g2, u2, h2, g2.stride(0), u2.stride(0),
                                                                    h2.stride(0), n_cols, ACT=act, BLOCK=BLOCK)
    return h


def gated_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: int, inplace: bool):
    """(dg, du); with inplace=True they are written into g's and u's storage (returned as those tensors)."""
    dh2, g2, u2 = _rows(dh), _rows(g), _rows(u)
    if inplace and g2.data_ptr() == g.data_ptr() and u2.data_ptr() == u.data_ptr():
        dg, du = g, u
        dg2, du2 = g2, u2
        # the kernel's writes are invisible to autograd: bump the version so that any other node that saved g or u
        # fails loudly instead of reading gradients
        increment_version(g)
        increment_version(u)
    else:
        dg, du = torch.empty_like(g), torch.empty_like(u)
        dg2, du2 = _rows(dg), _rows(du)
    n_rows, n_cols = g2.shape
    if n_rows and n_cols:
        with device_guard(g2):
            _gated_bwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
                dh2, g2, u2, dg2, du2, dh2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
                n_cols, ACT=act, BLOCK=BLOCK)
    return dg, du


class GatedActivationFunction(torch.autograd.Function):
    """h = act(g) * u; saves g and u only, recomputes act(g) in the backward."""

    @staticmethod
    def forward(ctx, g, u, act, inplace_backward):
        ctx.save_for_backward(g, u)
        ctx.act, ctx.inplace = act, inplace_backward
        return gated_forward(g, u, act)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du = gated_backward(dh, g, u, ctx.act, ctx.inplace)
        return dg, du, None, None


def _check(name: str, g: torch.Tensor, u: torch.Tensor) -> None:
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ConfigError(name, [Problem("u", f"{tuple(u.shape)} {u.dtype}", f"g's shape and dtype "
                                         f"{tuple(g.shape)} {g.dtype}", "pass the gate and up projections of one MLP")])


def swiglu(g: torch.Tensor, u: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """silu(g) * u for g, u of one shape (..., intermediate); Triton on CUDA, the torch reference elsewhere."""
    _check("swiglu", g, u)
    if not use_triton(g, u):
        return swiglu_reference(g, u)
    return GatedActivationFunction.apply(g, u, SILU, bool(inplace_backward))


def geglu(g: torch.Tensor, u: torch.Tensor, approximate: str = "none", inplace_backward: bool = False) -> torch.Tensor:
    """gelu(g, approximate) * u: 'none' is ACT2FN['gelu'] (erf), 'tanh' is ACT2FN['gelu_pytorch_tanh'] (Gemma)."""
    _check("geglu", g, u)
    if approximate not in GELU_APPROXIMATIONS:
        return geglu_reference(g, u, approximate)  # raises the ConfigError naming the allowed values
    if not use_triton(g, u):
        return geglu_reference(g, u, approximate)
    act = GELU_ERF if approximate == "none" else GELU_TANH
    return GatedActivationFunction.apply(g, u, act, bool(inplace_backward))
