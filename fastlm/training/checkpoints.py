"""Complete checkpoints only: a marker written after the Trainer has finished a checkpoint, and a picker that
resumes from the newest checkpoint carrying a valid marker.

transformers writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, RNG state, ``trainer_state.json``)
and then calls the callbacks' ``on_save``. `CheckpointCompletionCallback.on_save` lists every file of the folder
with its size, flushes them to disk and writes ``fastlm_checkpoint.json`` atomically (temporary file, fsync,
rename). A process killed while the folder was being written leaves it without a marker (or with files whose sizes
no longer match), so `find_last_complete_checkpoint` skips it; `remove_incomplete_checkpoints` deletes such
folders before resuming, so that checkpoint rotation (by modification time) cannot mistake one for the newest.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = ["COMPLETE_MARKER", "CheckpointCompletionCallback", "mark_checkpoint_complete", "checkpoint_problem",
           "list_checkpoints", "find_last_complete_checkpoint", "remove_incomplete_checkpoints"]

COMPLETE_MARKER = "fastlm_checkpoint.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# one of these must be present: the weights of an adapter or of a full model
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin")


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != COMPLETE_MARKER and not f.name.startswith(f".{COMPLETE_MARKER}")}


def mark_checkpoint_complete(folder: str | os.PathLike, global_step: int) -> Path:
    """Writes the completion marker of a finished checkpoint folder: its step and every file with its size."""
    folder = Path(folder)
    files = _files(folder)
    for name in files:
        _fsync(folder / name)
    marker = folder / COMPLETE_MARKER
    tmp = folder / f".{COMPLETE_MARKER}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"global_step": int(global_step), "files": files, "time": time.time()}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, marker)
    _fsync(folder)
    return marker


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """None when `folder` is a complete checkpoint, else why it is not."""
    folder = Path(folder)
    match = _CHECKPOINT_DIR.match(folder.name)
    if match is None or not folder.is_dir():
        return "not a checkpoint-N folder"
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the process stopped while writing it, or it was not written by fastlm)"
    try:
        info = json.loads(marker.read_text())
        step, files = int(info["global_step"]), dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {COMPLETE_MARKER} ({exc})"
    if step != int(match.group(1)):
        return f"the marker is for step {step}, not {match.group(1)}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker recorded {size}"
    if "trainer_state.json" not in files:
        return "no trainer_state.json"
    if not any(name in files for name in _WEIGHT_FILES):
        return "no model or adapter weights"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders of `output_dir`, newest (largest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir` (incomplete newer ones are logged and skipped), or None."""
    for folder in list_checkpoints(output_dir):
        why = checkpoint_problem(folder)
        if why is None:
            return folder
        logger.warning("fastlm: skipping %s: %s", folder, why)
    return None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes the checkpoint folders of `output_dir` that are not complete; returns them."""
    removed = []
    for folder in list_checkpoints(output_dir):
        if checkpoint_problem(folder) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class CheckpointCompletionCallback(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has finished writing it (``on_save`` runs after
    ``_save_checkpoint``). Only the main process writes the marker."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            mark_checkpoint_complete(folder, state.global_step)
