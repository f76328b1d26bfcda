"""The ordered list of patches `fastlm.patch.apply` installs. Order matters: a later patch wraps what an earlier
one installed (tiled MLP wraps whichever MLP forward is in place), fast_mlp takes only the MLPs fused LoRA left,
and `remove` undoes in reverse."""
from __future__ import annotations

from ..state import base_model_of
from .patchset import Patch, PatchOptions


def _bnb_cpu(model, arch, options: PatchOptions):
    from .bnb_cpu import keep_cpu_4bit_trainable

    return keep_cpu_4bit_trainable(model)


def _fp8_backward(model, arch, options: PatchOptions):
    if options.quantization not in ("fp8-row", "fp8-block"):
        return None
    from .fp8_backward import install_fp8_backward

    return install_fp8_backward(model)


def _offload_embedding(model, arch, options: PatchOptions):
    if not options.offload_embedding:
        return None
    from .offload_embedding import offload_embedding

    return offload_embedding(model)


def _fast_norms(model, arch, options: PatchOptions):
    if not options.fast_kernels:
        return None
    from .norms import install_fast_norms

    return install_fast_norms(base_model_of(model), arch)


def _has_lora(model) -> bool:
    return any(hasattr(m, "lora_A") for m in model.modules())


def _fast_lora(model, arch, options: PatchOptions):
    if not options.fast_kernels or not _has_lora(model):
        return None
    from .fast_lora import install_fast_lora

    return install_fast_lora(base_model_of(model))


def _fast_mlp(model, arch, options: PatchOptions):
    if not options.fast_kernels:
        return None
    from .fast_mlp import install_fast_mlp

    return install_fast_mlp(base_model_of(model), arch)


def _fast_attention(model, arch, options: PatchOptions):
    if not options.fast_kernels:
        return None
    from .attention import install_fast_attention

    projections = None
    if _has_lora(model):
        from .fast_lora import lora_o, lora_qkv

        projections = (lora_qkv, lora_o)  # functions of (attn, x): nothing of this instance kept in a closure
    return install_fast_attention(base_model_of(model), arch, projections)


def _fused_loss(model, arch, options: PatchOptions):
    if not options.fast_kernels:
        return None
    from .loss import install_fused_loss

    return install_fused_loss(base_model_of(model), arch)


def _tiled_mlp(model, arch, options: PatchOptions):
    if not options.tiled_mlp:
        return None
    from .tiled_mlp import install_tiled_mlp

    return install_tiled_mlp(model)


PATCHES: list[Patch] = [
    Patch("bnb_cpu_trainable", _bnb_cpu),
    Patch("fp8_backward", _fp8_backward),
    Patch("offload_embedding", _offload_embedding),
    Patch("fast_norms", _fast_norms),
    Patch("fast_lora", _fast_lora, follows_lora=True),
    Patch("fast_mlp", _fast_mlp, follows_lora=True),  # after fast_lora: the MLPs it fused are not taken again
    Patch("fast_attention", _fast_attention, follows_lora=True),
    Patch("fused_loss", _fused_loss),
    Patch("tiled_mlp", _tiled_mlp, follows_lora=True),
]
