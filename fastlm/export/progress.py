"""Progress bars for long export steps."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def byte_progress(total: int, desc: str):
    """A tqdm bar counting bytes (silent when FASTLM_NO_PROGRESS is set or tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or os.environ.get("FASTLM_NO_PROGRESS"):
        yield None
        return
    bar = tqdm(total=total, desc=f"fastlm {desc}", unit="B", unit_scale=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
