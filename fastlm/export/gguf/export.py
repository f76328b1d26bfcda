"""`model.save_pretrained_gguf(dir, tokenizer, quantization_method="q8_0" | [...])`.

The merged weights (LoRA folded in; a 4-bit model's original 16-bit weights) go straight into GGUF through
fastlm's converter; f32/f16/bf16/q8_0 need only the `gguf` package, other types are made from an f32 (or 16-bit)
file by llama.cpp's quantizer. An Ollama Modelfile is written beside the first file. Each file is then loaded in
llama.cpp and compared with the model in memory (verify=True, the default).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...errors import ProblemList
from ...state import get_state
from ...utils import imports
from ...utils.safe_write import atomic_directory, check_free_space, refuse_source_dir
from ..merged import check_unknown_kwargs, resolve_dtype
from ..model_files import export_config
from ..weights import merged_nbytes, merged_tensors
from .convert import DIRECT_TYPES, family_of, write_gguf
from .quantize import ALL_METHODS, LLAMA_CPP_INSTALL, bytes_per_weight, normalize, quantize_file

logger = logging.getLogger(__name__)


def gguf_file_name(method: str, stem: str = "model") -> str:
    return f"{stem}.{method.upper()}.gguf"


def _intermediate_type(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "bf16" if dtype == torch.bfloat16 else "f16"


def save_pretrained_gguf(model, save_directory, tokenizer=None, quantization_method="q8_0", verify=True,
                         push_to_hub=False, token=None, private=None, overwrite=True, file_stem="model",
                         maximum_memory_usage=0.75, commit_message=None, **kwargs) -> dict | None:
    """Write one GGUF file per method (plus a Modelfile) into `save_directory`; returns the verification report.
    `maximum_memory_usage` is accepted for Unsloth compatibility; the GGUF writer holds one file's tensors."""
    methods_in = quantization_method if isinstance(quantization_method, (list, tuple)) else [quantization_method]
    methods = [normalize(m) for m in methods_in]
    p = ProblemList("save_pretrained_gguf")
    bad = [m for m, n in zip(methods_in, methods) if n not in ALL_METHODS]
    if bad or not methods:
        p.add("quantization_method", bad or quantization_method, f"one of {ALL_METHODS} or a list of them",
              'use quantization_method="q8_0"')
    if not isinstance(maximum_memory_usage, (int, float)) or not 0 < maximum_memory_usage <= 0.95:
        p.add("maximum_memory_usage", maximum_memory_usage, "a fraction in (0, 0.95]", "use 0.75")
    if not isinstance(file_stem, str) or not file_stem or "/" in file_stem:
        p.add("file_stem", file_stem, "a file name without directories", 'use "model"')
    check_unknown_kwargs(p, kwargs, "remove it; see help(model.save_pretrained_gguf)")
    p.raise_if_any()
    methods = list(dict.fromkeys(methods))

    imports.require("gguf", "GGUF export", 'pip install "fastlm[gguf]"')
    needs_cpp = [m for m in methods if m not in DIRECT_TYPES]
    if needs_cpp:
        imports.require("llama_cpp", f"GGUF quantization {needs_cpp}", LLAMA_CPP_INSTALL)
    if verify and not imports.is_available("llama_cpp"):
        imports.require("llama_cpp", "checking the GGUF export in llama.cpp (or pass verify=False)", LLAMA_CPP_INSTALL)

    state = get_state(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(state, "tokenizer", None)
    dtype = resolve_dtype(None, model)
    config = export_config(model, dtype)
    family_of(config)  # unsupported families fail before any write
    target = refuse_source_dir(save_directory, model, "save_pretrained_gguf")
    n_weights = merged_nbytes(model, torch.float32) // 4
    inter = _intermediate_type(dtype)
    needed = sum(bytes_per_weight(m) for m in methods) + (bytes_per_weight(inter) if needs_cpp else 0)
    check_free_space(target, int(n_weights * needed) + (64 << 20), "save_pretrained_gguf")

    files: dict[str, Path] = {}
    with atomic_directory(target, overwrite=overwrite, what="save_pretrained_gguf") as tmp:
        for method in [m for m in methods if m in DIRECT_TYPES]:
            logger.warning("fastlm: writing GGUF %s", method)
            files[method] = write_gguf(tmp / gguf_file_name(method, file_stem), merged_tensors(model, dtype), config,
                                       tokenizer, method, name=file_stem)
        if needs_cpp:
            base = files.get(inter)
            scratch = None
            if base is None:
                scratch = tmp / f".intermediate.{inter}.gguf"
                base = write_gguf(scratch, merged_tensors(model, dtype), config, tokenizer, inter, name=file_stem)
            for method in needs_cpp:
                logger.warning("fastlm: quantizing GGUF %s with llama.cpp", method)
                files[method] = quantize_file(base, tmp / gguf_file_name(method, file_stem), method)
            if scratch is not None:
                scratch.unlink()
        from ..ollama import write_modelfile

        write_modelfile(tmp, gguf_file_name(methods[0], file_stem), tokenizer, config)
    files = {m: target / f.name for m, f in files.items()}
    logger.warning("fastlm: wrote GGUF %s to %s", ", ".join(methods), target)

    report = None
    if verify:
        from ..verify import save_report
        from .verify import verify_gguf

        source_quantized = bool(state and state.quantization)
        checks = [verify_gguf(model, tokenizer, files[m], m, source_quantized) for m in methods]
        report = save_report(target, {"format": "gguf", "files": {m: f.name for m, f in files.items()},
                                      "checks": checks})
    if push_to_hub:
        from ..hub import upload_folder

        repo_id = push_to_hub if isinstance(push_to_hub, str) else str(save_directory)
        upload_folder(target, repo_id, token=token, private=private, commit_message=commit_message)
    return report
