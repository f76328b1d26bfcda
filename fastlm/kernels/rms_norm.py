"""RMSNorm forward and backward (dX, dW) in Triton, with Gemma's (1 + w) offset and both casting conventions.

`rms_norm(x, weight, eps, offset=0.0, cast="llama")` matches transformers' LlamaRMSNorm (cast="llama": normalize
in fp32, cast to the input dtype, multiply by the weight) and GemmaRMSNorm (cast="gemma", offset=1.0: everything in
fp32, cast at the end). It also serves q/k-norm: x (b, s, h, head_dim) with weight (head_dim,) normalizes each head.

Kernels work on (rows, n) tiles of BLOCK_R rows so that short rows (head_dim 64..256) still fill a program. The
backward recomputes x_hat from x and the saved per-row rstd (fp32), and computes dW only when the weight needs a
gradient (norm weights are frozen under LoRA).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, Problem, UnsupportedFeatureError
from ._triton import as_rows, device_guard, jit, next_pow2, num_warps_for, program_count, tl, triton, use_triton
from .reference import check_rms_cast, rms_norm_reference

MAX_ROW = 65536
TILE_ELEMENTS = 4096  # elements per program tile: BLOCK_R = TILE_ELEMENTS // BLOCK_C rows


@jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset,
                         GEMMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    x_hat = x * rstd[:, None]
    if GEMMA:
        y = x_hat * (w + offset)[None, :]
    else:
        # LlamaRMSNorm: the normalized row is cast to the input dtype before the weight multiplies it;
        # `offset + weight` is formed in the weight's dtype, as torch would.
        w_eff = (w + offset).to(W.dtype.element_ty).to(tl.float32)
        y = w_eff[None, :] * x_hat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                         rows_per_program, offset, GEMMA: tl.constexpr, COMPUTE_DW: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GEMMA:
        w_eff = w + offset
    else:
        w_eff = (w + offset).to(W.dtype.element_ty).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        if COMPUTE_DW:
            if GEMMA:
                dw_acc += tl.sum(dy * x_hat, axis=0)
            else:
                dw_acc += tl.sum(dy * x_hat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        dx_hat = dy * w_eff[None, :]
        proj = tl.sum(dx_hat * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (dx_hat - x_hat * proj[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_ok)


def _blocks(n_cols: int) -> tuple[int, int]:
    block_c = next_pow2(n_cols)
    if block_c > MAX_ROW:
        raise UnsupportedFeatureError(
            f"rms_norm: rows of {n_cols} elements exceed the kernel's limit of {MAX_ROW}. "
            "Fix: use rms_norm_reference for such rows.")
    return max(1, TILE_ELEMENTS // block_c), block_c


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool):
    """Launch the forward. Returns (y with x's shape, x as (rows, n), rstd (rows,) fp32)."""
    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_r, block_c = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_r),)
    with device_guard(x2):
        _rms_norm_fwd_kernel[grid](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps, offset,
                                   GEMMA=gemma, BLOCK_R=block_r, BLOCK_C=block_c,
                                   num_warps=num_warps_for(block_r * block_c))
    return y.view(x.shape), x2, rstd


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                      gemma: bool, compute_dw: bool):
    """Launch the backward. dy: like y. Returns (dx (rows, n) in x's dtype, dw in weight's dtype or None)."""
    dy2 = as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    n_prog = program_count(x2.device, n_rows)
    rows_per_program = triton.cdiv(n_rows, n_prog)
    dw_partial = torch.empty((n_prog, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2.device)
    block_r, block_c = _blocks(n_cols)
    with device_guard(x2):
        _rms_norm_bwd_kernel[(n_prog,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0),
                                        dx.stride(0), n_rows, n_cols, rows_per_program, offset, GEMMA=gemma,
                                        COMPUTE_DW=compute_dw, BLOCK_R=block_r, BLOCK_C=block_c,
                                        num_warps=num_warps_for(block_r * block_c))
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x) * (offset + weight); saves x, weight and the per-row rstd (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma):
        y, x2, rstd = rms_norm_forward(x, weight, eps, offset, gemma)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.gemma, ctx.x_shape = offset, gemma, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.offset, ctx.gemma, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             cast: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dim of x (..., n) with weight (n,); Triton on CUDA, the torch reference elsewhere.

    cast="llama" matches LlamaRMSNorm (output dtype: promote(weight, x)); cast="gemma" with offset=1.0 matches
    GemmaRMSNorm (output dtype: x's). For q/k-norm pass the per-head tensor (..., head_dim) and its weight.
    """
    check_rms_cast(cast)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ConfigError("rms_norm", [Problem("weight.shape", tuple(weight.shape), f"({x.shape[-1]},), the size "
                                               "of x's last dim", "pass the norm weight of the normalized dim")])
    if not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps, offset, cast)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), cast == "gemma")
