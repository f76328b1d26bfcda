"""`model.save_pretrained_torchao(dir, tokenizer, torchao_config=None)`: the merged model quantized by torchao and
saved so that transformers reloads it (`TorchAoConfig` is stored in config.json).

torchao_config: None or "int8" (int8 weight-only), "int8-dynamic" (int8 dynamic activations + int8 weights),
"int4" (int4 weight-only: `IntxWeightOnlyConfig` group 32 on CPU, `Int4WeightOnlyConfig` group 128 on CUDA), or any
torchao `AOBaseConfig`. A model trained with QAT (`qat.prepare_qat`) is converted with its own scheme.
The check reloads the files: logits must equal the quantized model's exactly, and the KL divergence against the
model in memory is reported.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ProblemList
from ..state import get_state
from ..utils.imports import require
from ..utils.safe_write import atomic_directory, check_free_space, refuse_source_dir
from .merged import check_unknown_kwargs, resolve_dtype, write_quantized
from .model_files import device_map
from .weights import merged_nbytes

logger = logging.getLogger(__name__)

TORCHAO_INSTALL = 'pip install "fastlm[torchao]"'
NAMED_CONFIGS = ("int8", "int8-weight-only", "int8-dynamic", "int4")


def torchao_config_for(name):
    """A torchao config object for a name (or the object itself)."""
    require("torchao", "torchao export", TORCHAO_INSTALL)
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    if name is None or name in ("int8", "int8-weight-only"):
        return Int8WeightOnlyConfig()
    if name == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if name == "int4":
        if torch.cuda.is_available():
            config = Int4WeightOnlyConfig(group_size=128)
            _check_cuda_int4(config)
            return config
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    return name


def _probe_cuda_int4(config) -> None:
    """Quantize one small bf16 linear on the GPU with `config` (raises what torchao raises)."""
    from torchao.quantization import quantize_

    quantize_(torch.nn.Linear(256, 256, bias=False, dtype=torch.bfloat16, device="cuda"), config)


def _check_cuda_int4(config) -> None:
    """torchao's CUDA int4 layout needs kernels from another package (torchao 0.18: "Requires mslk >= 1.0.0"); without
    them transformers fails deep inside loading with a generic conversion error after the merge has been written.
    Probe first and say what to do."""
    try:
        _probe_cuda_int4(config)
    except ImportError as exc:
        raise RuntimeError(f"save_pretrained_torchao: torchao's CUDA int4 weight-only layout cannot run here "
                           f"(torchao: {str(exc).strip()}). Install what it names (e.g. pip install mslk), or use "
                           f'torchao_config="int8"; int4 on a machine without a GPU uses the CPU layout.') from exc


def _save_quantized(quant, directory: Path) -> None:
    try:
        quant.save_pretrained(directory, safe_serialization=True)
    except Exception as exc:  # noqa: BLE001 - some torchao tensor types have no safetensors form yet
        logger.warning("fastlm: torchao tensors of this config have no safetensors form (%s); saving PyTorch "
                       "pickles (load them with use_safetensors=False)", type(exc).__name__)
        for f in directory.glob("*.safetensors*"):
            f.unlink()
        quant.save_pretrained(directory, safe_serialization=False)


def save_pretrained_torchao(model, save_directory, tokenizer=None, torchao_config=None, verify=True,
                            overwrite=True, push_to_hub=False, token=None, private=None, **kwargs) -> dict | None:
    p = ProblemList("save_pretrained_torchao")
    if isinstance(torchao_config, str) and torchao_config not in NAMED_CONFIGS:
        p.add("torchao_config", torchao_config, f"None, one of {NAMED_CONFIGS} or a torchao AOBaseConfig",
              'use torchao_config="int8"')
    check_unknown_kwargs(p, kwargs, "remove it; see help(model.save_pretrained_torchao)")
    p.raise_if_any()
    require("torchao", "torchao export", TORCHAO_INSTALL)
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from .qat import qat_base_config, has_fake_quant

    state = get_state(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(state, "tokenizer", None)
    dtype = resolve_dtype(None, model)
    qat = has_fake_quant(model)
    config = qat_base_config(model) if qat and torchao_config is None else torchao_config_for(torchao_config)
    target = refuse_source_dir(save_directory, model, "save_pretrained_torchao")
    check_free_space(target, 2 * merged_nbytes(model, dtype) + (64 << 20), "save_pretrained_torchao")
    with atomic_directory(target, overwrite=overwrite, what="save_pretrained_torchao") as tmp:
        quant = write_quantized(model, tokenizer, tmp, dtype, TorchAoConfig(quant_type=config), 5 << 30,
                                save=_save_quantized)
    logger.warning("fastlm: wrote torchao %s export to %s", type(config).__name__, target)

    report = None
    if verify:
        from .verify import check, combine, compare_logits, logits_of, save_report, verify_inputs

        use_st = any(target.glob("*.safetensors"))
        reloaded = AutoModelForCausalLM.from_pretrained(target, device_map=device_map(), use_safetensors=use_st)
        inputs = verify_inputs(tokenizer)
        exact = combine([compare_logits(logits_of(quant, ids), logits_of(reloaded, ids)) for ids in inputs])
        vs_model = combine([compare_logits(logits_of(model, ids), logits_of(reloaded, ids)) for ids in inputs])
        report = save_report(target, {"format": "torchao", "config": repr(config), "checks": [
            check("torchao reload == quantized", exact, "exact"),
            check("torchao vs model", vs_model, "quantized")]})
    if push_to_hub:
        from .hub import upload_folder

        upload_folder(target, push_to_hub if isinstance(push_to_hub, str) else str(save_directory), token=token,
                      private=private)
    return report
