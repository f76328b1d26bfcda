"""GGUF quantization types: the ones fastlm writes itself and the ones made by llama.cpp's quantizer
(`llama_cpp.llama_model_quantize` from llama-cpp-python, the optional `gguf` extra; no download at run time)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ...errors import FastLMError
from ...utils.imports import require
from .convert import DIRECT_TYPES

LLAMA_CPP_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "fastlm[gguf]"  '
                     "(builds llama-cpp-python from source, ~5-10 minutes)")

# method -> llama.cpp file type constant name
LLAMA_CPP_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS", "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
}
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "float16": "f16",
           "float32": "f32", "bfloat16": "bf16", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}
ALL_METHODS = DIRECT_TYPES + tuple(LLAMA_CPP_TYPES)
# approximate bytes per weight, for the disk-space pre-flight
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72, "q5_k_s": 0.69,
                    "q5_0": 0.69, "q5_1": 0.75}


class GGUFQuantizeError(FastLMError, RuntimeError):
    """llama.cpp's quantizer returned an error."""


def normalize(method) -> str:
    m = str(method).strip().lower().replace("-", "_")
    return ALIASES.get(m, m)


def bytes_per_weight(method: str) -> float:
    return BYTES_PER_WEIGHT.get(method, 0.7)


def llama_cpp_module(needed_for: str):
    return require("llama_cpp", needed_for, LLAMA_CPP_INSTALL)


def quantize_file(src: Path, dst: Path, method: str) -> Path:
    """`src` (f32/f16/bf16 GGUF) -> `dst` of `method` with llama.cpp's quantizer."""
    llama_cpp = llama_cpp_module(f"GGUF quantization {method!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[method])
    params.nthread = max(1, min(os.cpu_count() or 1, 8))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise GGUFQuantizeError(f"llama.cpp could not quantize {src.name} to {method} (return code {rc}). Fix: try "
                                "another method (q8_0 is written without llama.cpp); K-quants need weight rows that "
                                "are multiples of 256.")
    return dst
