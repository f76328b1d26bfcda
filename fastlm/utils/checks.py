"""Small value checks shared by every validator (LoadPlan, get_peft_model, TrainConfig, CLI flags)."""
from __future__ import annotations

import math
from typing import Iterator


def is_number(value) -> bool:
    """A real int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return is_number(value) and math.isfinite(value)


def non_finite_items(value, name: str) -> Iterator[tuple[str, float]]:
    """(dotted name, value) of every inf / nan float inside `value` (nested lists, tuples and dicts included)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite_items(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from non_finite_items(item, f"{name}[{i}]")
