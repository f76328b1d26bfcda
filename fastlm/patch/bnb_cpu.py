"""Keep bitsandbytes 4-bit layers trainable on CPU.

On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks its weight in place into a bf16 inference
layout the first time it runs in eval mode on an input that needs no grad (e.g. `generate` before training, or a
model fresh from `from_pretrained`). `train()` never undoes it, and the repacked path computes in bf16 and passes
no gradient back through the frozen base weight, so LoRA gradients of earlier layers become wrong (measured:
cosine 0.18 to the fp32 gradients instead of 0.75 for ordinary NF4 noise) and training diverges. fastlm turns the
repacking off on every CPU 4-bit layer and restores layers that were already repacked.
"""
from __future__ import annotations

import logging

from .patchset import chain, replace_attr

logger = logging.getLogger(__name__)


def _linear4bit_layers(model):
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def keep_cpu_4bit_trainable(model):
    """Disable the in-place CPU repacking and undo it where it already happened. Returns the undo (which gives
    back each layer's own repacking flag; the restored weight layout holds the same values), or None when the
    model has no CPU 4-bit layers."""
    layers = [m for m in _linear4bit_layers(model) if m.weight.device.type == "cpu"]
    restored = 0
    undos = []
    for layer in layers:
        undos.append(replace_attr(layer, "support_avx512bf16_for_cpu", False))
        state = getattr(layer.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                layer.weight.data, state)
            restored += 1
    if restored:
        logger.warning("fastlm: restored %d bitsandbytes 4-bit layers from the CPU inference layout so they can be "
                       "trained (their scales were rounded to bf16 by that layout)", restored)
    return chain(undos)
