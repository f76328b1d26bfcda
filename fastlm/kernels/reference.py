"""Pure-torch references of the fast ops, written to match transformers' own code op for op.

CPU tensors run these; the Triton kernels in the sibling modules are tested against them (forward and backward).
Each function names the transformers code it mirrors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, Problem

RMS_CASTS = ("llama", "gemma")
GELU_APPROXIMATIONS = ("none", "tanh")


def check_rms_cast(cast: str) -> None:
    if cast not in RMS_CASTS:
        raise ConfigError("rms_norm", [Problem(
            "cast", cast, f"one of {RMS_CASTS}",
            "use 'llama' (normalize in fp32, cast to the input dtype, then multiply by the weight: LlamaRMSNorm) or "
            "'gemma' (multiply in fp32, cast at the end: GemmaRMSNorm)")])


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       cast: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., n), weight: (n,).

    cast="llama" is LlamaRMSNorm: `(offset + weight) * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`.
    cast="gemma" is GemmaRMSNorm: `(x.float() * rsqrt(...) * (offset + weight.float())).type_as(x)`; Gemma uses
    offset=1.0 (its weight is stored as w - 1).
    """
    check_rms_cast(cast)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "gemma":
        return (h * (offset + weight.float())).type_as(x)
    w = weight + offset if offset else weight
    return w * h.to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE as transformers' `apply_rotary_pos_emb` (Llama), with Phi-3's partial rotary.

    q: (b, hq, s, d), k: (b, hkv, s, d) (unsqueeze_dim=1; use 2 for (b, s, h, d)); cos, sin: (b, s, rot) as the
    model's rotary module returns them (rot <= d; the last d - rot dims pass through unrotated).
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def one(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        out = (x_rot * cos) + (rotate_half(x_rot) * sin)
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    return one(q), one(k)


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`ACT2FN['silu'](gate) * up`, the Llama MLP's activation."""
    return F.silu(g) * u


def geglu_reference(g: torch.Tensor, u: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`gelu(gate) * up`: ACT2FN['gelu'] (approximate='none') or ACT2FN['gelu_pytorch_tanh'] ('tanh')."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ConfigError("geglu", [Problem("approximate", approximate, f"one of {GELU_APPROXIMATIONS}",
                                            "use 'none' for exact gelu (erf) or 'tanh' for gelu_pytorch_tanh")])
    return F.gelu(g, approximate=approximate) * u


def causal_lm_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
                      ignore_index: int = -100) -> torch.Tensor:
    """Flat targets (N,) aligned with flat logits, as transformers' ForCausalLMLoss builds them.

    labels (b, s) are shifted left by one with `ignore_index` appended (position t predicts token t+1, the last
    position predicts nothing); `shift_labels` (b, s), when given, is used as is and `labels` must be None.
    """
    if (labels is None) == (shift_labels is None):
        raise ConfigError("causal LM loss", [Problem(
            "labels/shift_labels", "both given" if labels is not None else "neither given",
            "exactly one of them", "pass labels (shifted here as transformers does) or shift_labels (aligned)")])
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def transform_logits(logits: torch.Tensor, softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """fp32 logits after `scale` (Cohere-style multiply) then softcap (Gemma 2: cap * tanh(z / cap))."""
    z = logits.float()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def reduce_loss(losses_sum: torch.Tensor, targets: torch.Tensor, num_items_in_batch, ignore_index: int):
    """transformers' fixed_cross_entropy reduction: sum / num_items_in_batch, else mean over non-ignored targets."""
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(losses_sum.device)
        return losses_sum / num_items_in_batch
    return losses_sum / (targets != ignore_index).sum()


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            num_items_in_batch=None, softcap: float | None = None,
                            scale: float | None = None) -> torch.Tensor:
    """Token cross-entropy as transformers' fixed_cross_entropy, on fp32 logits (after scale and softcap).

    logits: (N, V), targets: (N,). Returns a scalar: sum / num_items_in_batch when given, else the mean over
    targets != ignore_index (NaN when all are ignored, as torch).
    """
    z = transform_logits(logits, softcap, scale)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        loss = reduce_loss(loss, targets, num_items_in_batch, ignore_index)
    return loss


def causal_lm_loss_reference(logits: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100,
                             num_items_in_batch=None, shift_labels: torch.Tensor | None = None,
                             softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """transformers' ForCausalLMLoss: logits (b, s, V), labels (b, s) shifted inside, or shift_labels as given."""
    targets = causal_lm_targets(labels, shift_labels, ignore_index).to(logits.device)
    return cross_entropy_reference(logits.reshape(-1, logits.shape[-1]), targets, ignore_index,
                                   num_items_in_batch, softcap, scale)


def fused_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                         labels: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                         ignore_index: int = -100, num_items_in_batch=None,
                                         shift_labels: torch.Tensor | None = None, softcap: float | None = None,
                                         scale: float | None = None) -> torch.Tensor:
    """lm_head then ForCausalLMLoss, materialising the full logits: hidden (b, s, H), weight (V, H), bias (V,)."""
    logits = F.linear(hidden, weight, bias)
    return causal_lm_loss_reference(logits, labels, ignore_index, num_items_in_batch, shift_labels, softcap, scale)
