"""A cheap check of safetensors files before transformers reads them: a truncated or corrupt file is named, with
what is wrong and the fix (transformers would say only "SafetensorError: incomplete metadata")."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import ModelSourceError

_MAX_HEADER = 100 * 2 ** 20  # the safetensors format caps its JSON header at 100 MB


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (header and every tensor's bytes present), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"it has {size} bytes, fewer than the 8-byte header length"
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > _MAX_HEADER or 8 + header_len > size:
            return f"its header says {header_len} bytes of metadata but the file has {size} bytes"
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as exc:
            return f"its metadata is not valid JSON ({exc})"
    if not isinstance(header, dict):
        return "its metadata is not a JSON object"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
               and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2), default=0)
    if 8 + header_len + end > size:
        return f"its tensors need {8 + header_len + end} bytes but the file has {size} (truncated)"
    return None


def check_safetensors_files(directory: Path) -> None:
    """Raise `ModelSourceError` naming the first incomplete or corrupt .safetensors file of `directory`."""
    for path in sorted(directory.glob("*.safetensors")):
        why = safetensors_problem(path)
        if why is not None:
            raise ModelSourceError(
                f"{path} is not a complete safetensors file: {why}. Fix: download or copy it again (an interrupted "
                "download or a full disk leaves a truncated file), or save the model again.")
