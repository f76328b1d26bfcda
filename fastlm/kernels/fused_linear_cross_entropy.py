"""Fused linear cross-entropy: the causal-LM loss from the last hidden states and the lm_head weight, in token
chunks, never materialising the full (tokens, vocab) logits.

`fused_linear_cross_entropy(hidden, weight, labels, ...)` equals `ForCausalLMLoss(lm_head(hidden), labels, ...)`
(labels shifted inside, or `shift_labels` as given; ignore_index; sum / num_items_in_batch when given, else the mean
over non-ignored targets), with the logit transforms of `cross_entropy` (`scale`, then Gemma-2 `softcap`).

Per chunk of C tokens: logits = h_c @ W^T (+ b) in the compute dtype; the cross-entropy kernel computes the loss
rows and overwrites the chunk with d loss / d logits (already divided by the denominator); then
grad_h_c = dlogits @ W, and, when the lm_head is trainable, grad_W += dlogits^T @ h_c and grad_b += sum(dlogits),
accumulated in fp32. The gradients are thus finished in the forward; the backward only scales them by grad_output.
C is chosen so that a chunk of logits, counted at fp32 size, stays within `chunk_bytes`. Tokens whose target is
ignore_index (masked prompts, padding) are left out of the matmuls unless `skip_ignored=False`.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, Problem
from ._triton import use_triton
from .cross_entropy import assert_targets_in_range, ce_launch, check_loss_args, loss_denominator
from .reference import causal_lm_targets, fused_linear_cross_entropy_reference

DEFAULT_CHUNK_BYTES = 256 * 2**20


def chunk_rows(n_rows: int, vocab: int, chunk_bytes: int) -> int:
    """Tokens per chunk so that a (C, vocab) fp32 logits chunk fits in chunk_bytes: at least 1, and a multiple of 64
    when that many fit (matmul tiles)."""
    rows = min(n_rows, chunk_bytes // (4 * vocab))
    return max(1, rows - rows % 64 if 64 <= rows < n_rows else rows)


def _accumulate_weight_grad(grad_w: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor, chunk_bytes: int):
    """grad_w (V, H) fp32 += dlogits (C, V)^T @ x (C, H), in vocab blocks so the low-precision product stays small."""
    if dlogits.dtype == torch.float32:
        grad_w.addmm_(dlogits.t(), x)
        return
    vocab, hidden = grad_w.shape
    block = max(1, chunk_bytes // (6 * hidden))  # product (2 bytes) + its fp32 copy (4 bytes) per element
    for v0 in range(0, vocab, block):
        grad_w[v0:v0 + block] += (dlogits[:, v0:v0 + block].t() @ x).float()


def _kept_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of rows with a real target, or None when all have one (one host sync to size the index)."""
    keep = (targets != ignore_index).nonzero().squeeze(1)
    return None if keep.numel() == targets.numel() else keep


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """loss(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,)); stores finished, unscaled gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, num_items_in_batch, softcap, scale, chunk_bytes,
                grad_enabled, skip_ignored):
        n_rows, _ = hidden.shape
        vocab = weight.shape[0]
        dtype = _compute_dtype(hidden, weight)
        # needs_input_grad stays True under torch.no_grad(), so the caller's grad mode is passed in
        need_x, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            x = hidden.to(dtype)
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            denom = loss_denominator(targets, num_items_in_batch, ignore_index, hidden.device)
            inv_denom = (1.0 / denom).reshape(1)
            keep = _kept_rows(targets, ignore_index) if skip_ignored else None
            if keep is not None:
                x, targets = x.index_select(0, keep), targets.index_select(0, keep)
            n_used = x.shape[0]
            loss_rows = torch.empty(n_used, dtype=torch.float32, device=hidden.device)
            grad_x = torch.empty_like(x) if need_x else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
            any_grad = need_x or need_w or need_b
            step = chunk_rows(n_used, vocab, chunk_bytes)
            for start in range(0, n_used, step):
                end = min(start + step, n_used)
                x_c = x[start:end]
                logits = x_c @ w.t() if b is None else torch.addmm(b, x_c, w.t())
                loss_c, _ = ce_launch(logits, targets[start:end], ignore_index, softcap, scale,
                                      grad=logits if any_grad else None, grad_scale=inv_denom)
                loss_rows[start:end] = loss_c
                if need_x:
                    torch.mm(logits, w, out=grad_x[start:end])
                if need_w:
                    _accumulate_weight_grad(grad_w, logits, x_c, chunk_bytes)
                if need_b:
                    grad_b += logits.sum(0, dtype=torch.float32)
                del logits
            if need_x and keep is not None:  # ignored rows get a zero gradient
                grad_x = torch.zeros((n_rows, x.shape[1]), dtype=x.dtype, device=x.device).index_copy_(0, keep, grad_x)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss_rows.sum() / denom

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if grad_x is not None:
            grad_x = grad_x.mul_(grad_loss.to(grad_x.dtype)).to(x_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.float()).to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss.float()).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def _check(hidden, weight, bias, labels, shift_labels, chunk_bytes) -> None:
    problems = []
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        problems.append(Problem("weight.shape", tuple(weight.shape), f"(vocab, {hidden.shape[-1]}) to match hidden's "
                                "last dim", "pass lm_head.weight of this model"))
    elif bias is not None and tuple(bias.shape) != (weight.shape[0],):
        problems.append(Problem("bias.shape", tuple(bias.shape), f"({weight.shape[0]},)", "pass lm_head.bias"))
    given = labels if labels is not None else shift_labels
    if given is not None and tuple(given.shape) != tuple(hidden.shape[:-1]):
        problems.append(Problem("labels.shape" if labels is not None else "shift_labels.shape", tuple(given.shape),
                                f"hidden's leading shape {tuple(hidden.shape[:-1])}",
                                "pass one label per hidden-state row"))
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        problems.append(Problem("chunk_bytes", chunk_bytes, "a positive int (bytes of one fp32 logits chunk)",
                                f"leave the default {DEFAULT_CHUNK_BYTES}"))
    if problems:
        raise ConfigError("fused_linear_cross_entropy", problems)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                               bias: torch.Tensor | None = None, ignore_index: int = -100, num_items_in_batch=None,
                               shift_labels: torch.Tensor | None = None, softcap: float | None = None,
                               scale: float | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                               skip_ignored: bool = True) -> torch.Tensor:
    """Causal-LM loss of lm_head(hidden) without the full logits. Returns an fp32 scalar.

    hidden: (b, s, H) (or (N, H)), the final-norm output; weight: (V, H), lm_head.weight; bias: (V,) or None.
    labels: (b, s), shifted inside as ForCausalLMLoss does; or shift_labels: (b, s), already aligned (not both).
    softcap: Gemma 2's final_logit_softcapping; scale: a logit multiplier (Cohere logit_scale; Granite passes
    1 / logits_scaling). chunk_bytes: budget of one logits chunk counted at fp32 size.
    skip_ignored: compute logits only for tokens whose target is not ignore_index (masked prompts, padding, each
    row's last position), at the cost of one host sync per call; pass False under CUDA graphs.
    CUDA runs the chunked Triton path; elsewhere the torch reference (full logits).
    """
    check_loss_args("fused_linear_cross_entropy", ignore_index, softcap, scale, num_items_in_batch)
    _check(hidden, weight, bias, labels, shift_labels, chunk_bytes)
    if not use_triton(hidden, weight):
        return fused_linear_cross_entropy_reference(hidden, weight, labels, bias, ignore_index, num_items_in_batch,
                                                    shift_labels, softcap, scale)
    targets = causal_lm_targets(labels, shift_labels, ignore_index).to(hidden.device).contiguous()
    assert_targets_in_range(targets, weight.shape[0], ignore_index)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return FusedLinearCrossEntropyFunction.apply(flat, weight, bias, targets, ignore_index, num_items_in_batch,
                                                 softcap, scale, chunk_bytes, torch.is_grad_enabled(),
                                                 bool(skip_ignored))
