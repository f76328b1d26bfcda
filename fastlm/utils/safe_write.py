"""Writes that lose nothing: never into the directory a model was loaded from, always through a temporary
directory that is renamed into place only when complete, with a free-space check before the first byte.

Used by every fastlm save (training output, `save_pretrained`, exports).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ..errors import FastLMError

logger = logging.getLogger(__name__)

# temporary directories beside a target are named .<target>.tmp-<host>-<pid>-<random> (and .<target>.old-<host>-
# <pid> while the old target is swapped out), so a later write can tell those of a killed process
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
STALE_AFTER_S = 24 * 3600  # temp dirs of another host (or unnamed ones) are stale after a day


class UnsafeWriteError(FastLMError, ValueError):
    """A write that would overwrite the source model, a file, or fill the disk."""


def _resolved(path) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def source_dirs_of(model) -> list[Path]:
    """The directories this model was loaded from (base model and, for an adapter, the adapter directory)."""
    from ..state import get_state

    dirs: list[Path] = []
    state = get_state(model)
    for src in (getattr(state, "source", None), getattr(state, "adapter_source", None)):
        path = getattr(src, "path", None)
        if path is not None:
            dirs.append(_resolved(path))
    return dirs


def refuse_source_dir(target, sources, what: str = "save") -> Path:
    """Raise if `target` is one of `sources` (paths or a model) or lies inside one. Returns the resolved target."""
    target_path = _resolved(target)
    paths = source_dirs_of(sources) if not isinstance(sources, (list, tuple, set)) else \
        [_resolved(s) for s in sources]
    for src in paths:
        if target_path == src or src in target_path.parents:
            raise UnsafeWriteError(
                f"{what}: the target {str(target_path)!r} is the directory the model was loaded from "
                f"({str(src)!r}); writing there would overwrite the source model. Fix: choose another directory, "
                f"e.g. {str(src.parent / (src.name + '-finetuned'))!r}.")
    return target_path


def check_target_dir(target, what: str = "save") -> Path:
    """The target must be a directory or not exist yet, and its nearest existing parent must be writable."""
    path = _resolved(target)
    if path.exists() and not path.is_dir():
        raise UnsafeWriteError(f"{what}: {str(path)!r} is a file, not a directory. Fix: pass a directory path.")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UnsafeWriteError(f"{what}: {str(parent)!r} (a parent of {str(path)!r}) is a file, not a directory. "
                               "Fix: pass a path under a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnsafeWriteError(f"{what}: {str(parent)!r} is not writable, so {str(path)!r} cannot be written. "
                               "Fix: choose a directory you can write to, or change its permissions.")
    return path


def check_free_space(target, needed_bytes: int, what: str = "save") -> None:
    """Raise before writing when the file system holding `target` has less than `needed_bytes` free."""
    path = _resolved(target)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise UnsafeWriteError(
            f"{what}: needs about {needed_bytes / 1e9:.2f} GB free at {str(path)!r}, but only {free / 1e9:.2f} GB "
            "is free. Fix: free some space or choose a target on another disk.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_stale(entry: Path, host: str | None, pid: str | None) -> bool:
    if host == _HOST and pid is not None:
        return int(pid) != os.getpid() and not _alive(int(pid))
    try:
        return time.time() - entry.lstat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_stale_temps(target) -> list[Path]:
    """Remove the temporary directories a killed write left beside `target`: those named for a process of this host
    that is gone, and any older than a day. A stale swapped-out old target (`.<target>.old-*`, left by a kill
    between the two renames) is put back when `target` is missing. Returns what was removed or restored."""
    path = _resolved(target)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(?:([0-9a-f]{{8}})-(\d+)(?:-|$))?")
    done = []
    for entry in sorted(path.parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or not entry.is_dir() or not _is_stale(entry, m.group(2), m.group(3)):
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(entry, path)
            logger.warning("fastlm: restored %s from %s, left by a write that was killed", path, entry.name)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            logger.warning("fastlm: removed %s, left beside %s by a write that was killed", entry.name, path.name)
        done.append(entry)
    return done


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A fresh hidden temporary directory next to `path` (after removing stale ones), removed when the body raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_HOST}-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_directory(target, overwrite: bool = True, what: str = "save") -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one rename.

    On any error the temporary directory is removed and `target` is left exactly as it was. With
    `overwrite=False` an existing non-empty target is an error before anything is written.
    """
    path = check_target_dir(target, what)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UnsafeWriteError(f"{what}: {str(path)!r} already exists and is not empty. Fix: choose a new "
                               "directory, or pass overwrite=True to replace it.")
    with _temp_beside(path) as tmp:
        yield tmp
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{_HOST}-{os.getpid()}"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _move_tree_into(src: Path, dst: Path) -> None:
    """Move every file of `src` into `dst` (same relative paths), each with one atomic rename."""
    for path in sorted(src.rglob("*")):
        if path.is_dir():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)


@contextlib.contextmanager
def staged_directory(target, what: str = "save") -> Iterator[Path]:
    """Like `atomic_directory`, but an existing `target` keeps the files this write does not replace (a training
    output folder keeps its checkpoints when the adapter is saved beside them).

    Yields a fresh temporary directory beside `target`. On success: a missing or empty `target` is replaced by it
    in one rename; otherwise each written file is renamed into `target`, so every file there is either the old or
    the complete new one. On error nothing in `target` changes.
    """
    path = check_target_dir(target, what)
    with _temp_beside(path) as tmp:
        yield tmp
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if not path.exists():
            os.replace(tmp, path)
        else:
            _move_tree_into(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
