"""Cross-entropy over large vocabularies in Triton: online logsumexp over vocab blocks, fp32 math, logit scale and
Gemma-2 softcap, ignore_index, and transformers' `num_items_in_batch` reduction.

`cross_entropy(logits, targets, ...)` matches transformers' `fixed_cross_entropy` on `logits.float()` after the
optional transforms `z = scale * logits` then `z = softcap * tanh(z / softcap)`: the loss is
`sum / num_items_in_batch` when that is given, else the mean over targets != ignore_index.
`causal_lm_loss(logits, labels, ...)` is `ForCausalLMLoss` (labels shifted left inside, or `shift_labels` as given).

One program per token row walks the vocab in blocks, so a 256k vocab never needs a 256k-wide register tile. The
forward saves the per-row logsumexp (fp32); the backward walks the row once more and writes
`(softmax - onehot) * dz/dlogit * grad_output / denominator`, into a new tensor or, with `inplace_backward=True`,
into the logits themselves (they are dead after the loss; that saves a logits-sized buffer). The same kernel also
serves the fused linear cross-entropy, which computes each chunk's gradient in its forward.
"""
from __future__ import annotations

import torch
from torch.autograd.graph import increment_version

from ..errors import ConfigError, Problem
from ._triton import device_guard, interpreter_on, jit, next_pow2, tl, use_triton
from .reference import causal_lm_targets, cross_entropy_reference

MAX_BLOCK = 8192
INTERPRETER_MAX_BLOCK = 1024  # small blocks under the interpreter so tests walk several vocab blocks


@jit
def _softcapped(x, softcap, scale, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/dx) for z = softcap * tanh(scale * x / softcap), in fp32."""
    dz = tl.full(x.shape, 1.0, tl.float32)
    if HAS_SCALE:
        x = x * scale
        dz = dz * scale
    if HAS_SOFTCAP:
        a = tl.minimum(tl.maximum(x / softcap, -15.0), 15.0)
        t = 2.0 * tl.sigmoid(2.0 * a) - 1.0
        x = softcap * t
        dz = dz * (1.0 - t * t)
    return x, dz


@jit
def _ce_kernel(LOGITS, TARGETS, LOSS, LSE, GRAD, GRAD_SCALE, stride_l, stride_g, n_cols, ignore_index, softcap,
               scale, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_LSE: tl.constexpr,
               WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: loss and logsumexp (COMPUTE_LSE) and/or the logit gradient times *GRAD_SCALE (WRITE_GRAD)."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64)
    valid = target != ignore_index
    row_ptr = LOGITS + row * stride_l
    offs = tl.arange(0, BLOCK)
    if COMPUTE_LSE:
        m = float("-inf")
        d = 0.0
        z_target = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z, _ = _softcapped(x, softcap, scale, HAS_SCALE, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            z_target += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
        lse = m + tl.log(d)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(valid, lse - z_target, 0.0))
    else:
        lse = tl.load(LSE + row)
    if WRITE_GRAD:
        g_scale = tl.where(valid, tl.load(GRAD_SCALE).to(tl.float32), 0.0)
        grad_ptr = GRAD + row * stride_g
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z, dz = _softcapped(x, softcap, scale, HAS_SCALE, HAS_SOFTCAP)
            p = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_ptr + cols, (p * dz * g_scale).to(GRAD.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(next_pow2(n_cols), INTERPRETER_MAX_BLOCK if interpreter_on() else MAX_BLOCK)


def ce_launch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap, scale, *,
              lse: torch.Tensor | None = None, grad: torch.Tensor | None = None,
              grad_scale: torch.Tensor | None = None):
    """Run the kernel on logits (N, V) with unit last stride and targets (N,).

    lse=None computes and returns (loss_rows fp32 (N,), lse fp32 (N,)); a given lse skips that pass. grad (N, V),
    which may be `logits` itself, receives the logit gradient times the fp32 scalar tensor grad_scale.
    """
    n_rows, n_cols = logits.shape
    compute_lse = lse is None
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if compute_lse else None
    if compute_lse:
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    write_grad = grad is not None
    block = _block(n_cols)
    if not n_rows:
        return loss_rows, lse
    with device_guard(logits):
        _ce_kernel[(n_rows,)](
            logits, targets, loss_rows if compute_lse else lse, lse, grad if write_grad else logits,
            grad_scale if write_grad else lse, logits.stride(0), grad.stride(0) if write_grad else 0, n_cols,
            ignore_index, float(softcap or 1.0), float(scale or 1.0), HAS_SCALE=scale is not None,
            HAS_SOFTCAP=softcap is not None, COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, BLOCK=block,
            num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return loss_rows, lse


def loss_denominator(targets: torch.Tensor, num_items_in_batch, ignore_index: int, device) -> torch.Tensor:
    """fp32 scalar tensor: num_items_in_batch when given, else the count of targets != ignore_index (no host sync)."""
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(device=device, dtype=torch.float32)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=device, dtype=torch.float32)
    return torch.tensor(float(num_items_in_batch), device=device)


def assert_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Fail (without a host sync: an async device assert on CUDA) when a target is neither in [0, vocab) nor
    ignore_index; the kernel would otherwise silently use logsumexp as that row's loss, where torch raises."""
    ok = ((targets >= 0) & (targets < vocab)) | (targets == ignore_index)
    torch._assert_async(ok.all(), f"cross-entropy targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
                                  "fix the labels (or the ignore_index) passed to the loss")


def check_loss_args(context: str, ignore_index, softcap, scale, num_items_in_batch) -> None:
    problems = []
    if softcap is not None and not float(softcap) > 0:
        problems.append(Problem("softcap", softcap, "None or a positive number (Gemma 2: 30.0)",
                                "pass the config's final_logit_softcapping or None"))
    if scale is not None and not float(scale) > 0:
        problems.append(Problem("scale", scale, "None or a positive number", "pass the config's logit scale or None"))
    if not isinstance(ignore_index, int):
        problems.append(Problem("ignore_index", ignore_index, "an int (transformers: -100)", "pass an int"))
    if num_items_in_batch is not None and not (torch.is_tensor(num_items_in_batch) or
                                               isinstance(num_items_in_batch, (int, float))):
        problems.append(Problem("num_items_in_batch", type(num_items_in_batch).__name__,
                                "None, a number or a tensor", "pass what the Trainer passes, or None"))
    if problems:
        raise ConfigError(context, problems)


class CrossEntropyFunction(torch.autograd.Function):
    """Scalar loss of logits (N, V) and targets (N,); saves logits, targets, lse (fp32) and the denominator."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, num_items_in_batch, softcap, scale, inplace_backward):
        loss_rows, lse = ce_launch(logits, targets, ignore_index, softcap, scale)
        denom = loss_denominator(targets, num_items_in_batch, ignore_index, logits.device)
        ctx.save_for_backward(logits, targets, lse, denom)
        ctx.args = (ignore_index, softcap, scale, inplace_backward)
        return loss_rows.sum() / denom

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, denom = ctx.saved_tensors
        ignore_index, softcap, scale, inplace = ctx.args
        grad = logits if inplace else torch.empty_like(logits)
        if inplace:  # other nodes that saved these logits must fail, not read gradients
            increment_version(logits)
        grad_scale = (grad_loss.float() / denom).reshape(1)
        ce_launch(logits, targets, ignore_index, softcap, scale, lse=lse, grad=grad, grad_scale=grad_scale)
        return grad, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, num_items_in_batch=None,
                  softcap: float | None = None, scale: float | None = None,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Token cross-entropy, fp32 scalar. logits: (..., V) any float dtype; targets: (...) int, same leading shape.

    Matches transformers' fixed_cross_entropy on `softcap * tanh(scale * logits.float() / softcap)`.
    `inplace_backward=True` writes the gradient into `logits` (only when nothing reads the logits afterwards).
    """
    check_loss_args("cross_entropy", ignore_index, softcap, scale, num_items_in_batch)
    if targets.shape != logits.shape[:-1]:
        raise ConfigError("cross_entropy", [Problem("targets.shape", tuple(targets.shape),
                                                    f"logits' leading shape {tuple(logits.shape[:-1])}",
                                                    "pass one target per logits row (shift labels first)")])
    flat = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1).to(logits.device)
    if not use_triton(flat):
        return cross_entropy_reference(flat, targets, ignore_index, num_items_in_batch, softcap, scale)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    assert_targets_in_range(targets, flat.shape[-1], ignore_index)
    return CrossEntropyFunction.apply(flat, targets.contiguous(), ignore_index, num_items_in_batch, softcap, scale,
                                      bool(inplace_backward))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100,
                   num_items_in_batch=None, shift_labels: torch.Tensor | None = None, softcap: float | None = None,
                   scale: float | None = None, inplace_backward: bool = False) -> torch.Tensor:
    """transformers' ForCausalLMLoss: logits (b, s, V), labels (b, s) shifted inside, or shift_labels as given."""
    targets = causal_lm_targets(labels, shift_labels, ignore_index)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index, num_items_in_batch, softcap,
                         scale, inplace_backward)
