"""Quantization-aware training with torchao fake quantization, and the scheme's real quantization for export.

`prepare_qat(model, scheme)` swaps the transformer's linear layers (not lm_head) for torchao's fake-quantized
linears, so training sees the rounding of the target format; `save_pretrained_torchao` then quantizes the trained
weights with the same scheme's real config (what torchao's QAT "convert" step does) and checks the result against
the fake-quantized model.

Wiring: `from_pretrained(..., qat_scheme=S)` should validate `S in QAT_SCHEMES` and call `prepare_qat(model, S)`
after loading.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedFeatureError
from ..state import base_model_of
from ..utils.imports import require

QAT_SCHEMES = ("int4", "int8-int4", "fp8-int4", "fp8-fp8")
_CUDA_ONLY = ("fp8-int4", "fp8-fp8")
_ATTR = "_fastlm_qat_scheme"


def scheme_config(scheme: str):
    """The torchao post-training config whose rounding a QAT scheme simulates."""
    require("torchao", f"qat_scheme={scheme!r}", 'pip install "fastlm[torchao]"')
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    if scheme not in QAT_SCHEMES:
        raise UnsupportedFeatureError(f"qat_scheme={scheme!r} is not supported; use one of {QAT_SCHEMES}.")
    if scheme in _CUDA_ONLY and not torch.cuda.is_available():
        raise UnsupportedFeatureError(f"qat_scheme={scheme!r} needs a CUDA GPU (FP8 kernels). Fix: use 'int4' or "
                                      "'int8-int4' on CPU.")
    if scheme == "int4":
        if torch.cuda.is_available():
            return Int4WeightOnlyConfig(group_size=128)
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    if scheme == "int8-int4":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    if scheme == "fp8-int4":
        return Float8DynamicActivationInt4WeightConfig()
    return Float8DynamicActivationFloat8WeightConfig()


def prepare_qat(model, scheme: str):
    """Insert fake quantization for `scheme` into the model's linear layers (in place); returns the model."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    config = scheme_config(scheme)
    base = base_model_of(model)

    def is_target(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")

    quantize_(base, QATConfig(config, step="prepare"), filter_fn=is_target)
    setattr(base, _ATTR, scheme)
    return model


def has_fake_quant(model) -> bool:
    return getattr(base_model_of(model), _ATTR, None) is not None


def qat_base_config(model):
    """The real quantization config for a model prepared by `prepare_qat`."""
    return scheme_config(getattr(base_model_of(model), _ATTR))
