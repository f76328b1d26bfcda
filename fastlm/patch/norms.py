"""RMSNorm through fastlm's kernel on every norm of the decoder (layer norms, q/k-norms, final norm), per instance.
The kernel takes the resolved eps, offset (Gemma's 1 + w) and casting mode as plain values."""
from __future__ import annotations

from typing import NamedTuple

from ..arch import get_path
from ..kernels.rms_norm import rms_norm
from .patchset import bind_forward, chain

_SLOT = "_fastlm_norm"


class NormSettings(NamedTuple):
    eps: float
    offset: float
    cast: str


def norm_forward(self, x):
    """RMSNorm forward bound to the norm module: (..., hidden) -> (..., hidden), with the module's own weight."""
    eps, offset, cast = getattr(self, _SLOT)
    return rms_norm(x, self.weight, eps, offset, cast)


def norm_modules(model, arch) -> list:
    """Every RMSNorm module of the decoder that `arch` names, final norm last."""
    found = []
    for layer in get_path(model, arch.layers_path):
        found += [getattr(layer, name) for name in arch.layer_norm_names]
        if arch.qk_norm_names:
            attn = getattr(layer, arch.attention_name)
            found += [getattr(attn, name) for name in arch.qk_norm_names]
    found.append(get_path(model, arch.final_norm_path))
    return found


def install_fast_norms(model, arch):
    """Returns the undo, or None without an ArchConfig."""
    if arch is None:
        return None
    settings = NormSettings(arch.norm_eps, arch.norm_offset, arch.norm_cast)
    return chain([bind_forward(norm, norm_forward, _SLOT, settings) for norm in norm_modules(model, arch)])
