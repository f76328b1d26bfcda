"""FP8 weights and dynamic FP8 activations through torchao (GPUs with compute capability >= 8.9).

`load_in_fp8=True` / "row": one scale per output row (and per token for activations).
`load_in_fp8="block"`: 128x128 weight blocks with 1x128 activation groups (DeepSeek-V3-style block scales).
"""
from __future__ import annotations

from ..utils.imports import require


def fp8_quantization_config(mode: str):
    require("torchao", "load_in_fp8", "pip install torchao")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerBlock, PerRow
    from transformers import TorchAoConfig

    if mode == "fp8-block":
        granularity = [PerBlock([1, 128]), PerBlock([128, 128])]
    else:
        granularity = PerRow()
    return TorchAoConfig(quant_type=Float8DynamicActivationFloat8WeightConfig(granularity=granularity))
