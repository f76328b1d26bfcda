"""Lazy, cached availability checks for optional stacks (DESIGN principle 6)."""
from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

from ..errors import MissingDependencyError


@lru_cache(maxsize=None)
def is_available(module: str) -> bool:
    """True when `module` can be imported (looked up once, without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, needed_for: str, install: str | None = None):
    """Import `module` or raise an error naming what needs it and how to install it."""
    if not is_available(module):
        raise MissingDependencyError(module, needed_for, install or f"pip install {module}")
    return importlib.import_module(module)
