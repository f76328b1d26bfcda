"""Typed config sections: fields that carry their rule, and the conversion of a YAML mapping (plus ``key=value``
overrides) into section dataclasses, collecting every problem in a `ProblemList` instead of stopping at the first.

A field is declared with `spec(default, allowed, check, fix, choices)`; its type annotation decides the accepted
YAML types (``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``List[...]``, ``Dict[...]``, ``Union[...]``).
Integers are accepted as floats and numeric strings such as ``1e-3`` (which YAML 1.1 reads as a string) as numbers;
bools are never numbers.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import field
from typing import Any, Callable, Iterable, Mapping

from ..errors import ProblemList
from ..utils.checks import non_finite_items

__all__ = ["spec", "positive", "non_negative", "parse_overrides", "apply_overrides", "build_section",
           "did_you_mean"]


def spec(default, allowed: str, check: Callable[[Any], bool] | None = None, fix: str = "",
         choices: tuple | None = None):
    """A config field: its default, the rule as text, an optional predicate and the fix to suggest."""
    meta = {"allowed": allowed, "check": check, "fix": fix, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def positive(v) -> bool:
    return v > 0


def non_negative(v) -> bool:
    return v >= 0


# ---------------------------------------------------------------------------------------------------------------
# overrides

def parse_overrides(overrides: Iterable[str], problems: ProblemList) -> dict:
    """``["training.max_steps=10", "resume=true"]`` -> nested dict; values are read as YAML scalars."""
    import yaml

    nested: dict = {}
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.add("override", item, "key=value with a dotted key, e.g. training.max_steps=10",
                         "write the key, an equals sign and the value without spaces around '='")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problems.add(key, raw, f"a YAML value ({str(exc).splitlines()[0]})", "quote strings with special "
                         "characters, e.g. key='a: b'")
            continue
        target = nested
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return nested


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "extra":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def apply_overrides(raw: Mapping, overrides: Iterable[str], problems: ProblemList) -> dict:
    return _merge(dict(raw or {}), parse_overrides(overrides, problems))


# ---------------------------------------------------------------------------------------------------------------
# typed conversion

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin in (list, typing.List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, typing.Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


_FAIL = object()


def _coerce(value, tp):
    """Value converted to type `tp`, or _FAIL. Integers are accepted as floats, numeric strings such as '1e-3'
    (which YAML reads as a string) as numbers; bools are never numbers."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None:
            return None if type(None) in args else _FAIL
        for arg in args:  # exact types first, then conversions
            if arg is not type(None) and _is_instance(value, arg):
                return _coerce(value, arg)
        for arg in args:
            if arg is not type(None):
                converted = _coerce(value, arg)
                if converted is not _FAIL:
                    return converted
        return _FAIL
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            return _FAIL
        (item_tp,) = typing.get_args(tp)
        items = [_coerce(v, item_tp) for v in value]
        return _FAIL if any(i is _FAIL for i in items) else items
    if origin in (dict, typing.Dict):
        return dict(value) if isinstance(value, Mapping) else _FAIL
    if tp is bool:
        return value if isinstance(value, bool) else _FAIL
    if tp is int:
        if isinstance(value, bool):
            return _FAIL
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _FAIL
    if tp is float:
        if isinstance(value, bool):
            return _FAIL
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _FAIL
        return _FAIL
    if tp is str:
        return value if isinstance(value, str) else _FAIL
    return value


def _is_instance(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Dict):
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else False


def did_you_mean(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def build_section(name: str, cls, raw, problems: ProblemList):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.add(name, raw, f"a mapping of the keys {sorted(fields)}", f"write the section as '{name}:' "
                     "followed by indented key: value lines")
        return cls()
    values = {}
    for key, value in raw.items():
        if key not in fields:
            problems.add(f"{name}.{key}", value, f"not a key of the {name} section; its keys are "
                         + ", ".join(fields), did_you_mean(str(key), fields) + "remove it or fix its spelling")
            continue
        meta = fields[key].metadata
        converted = _coerce(value, hints[key])
        where = f"{name}.{key}"
        if converted is _FAIL:
            problems.add(where, value, meta["allowed"], meta["fix"] or
                         f"write {_type_name(hints[key])}")
            continue
        bad = list(non_finite_items(converted, where))
        if bad:
            for bad_where, bad_value in bad:
                problems.add(bad_where, bad_value, "a finite number (inf and nan are never valid)",
                             meta["fix"] or "write a finite number")
            continue
        if converted is not None:
            if meta["choices"] is not None and converted not in meta["choices"]:
                close = did_you_mean(str(converted), [str(c) for c in meta["choices"]])
                problems.add(where, value, meta["allowed"], close + (meta["fix"] or "pick one of the allowed values"))
                continue
            check = meta["check"]
            try:
                ok = check is None or check(converted)
            except TypeError:
                ok = False
            if not ok:
                problems.add(where, value, meta["allowed"], meta["fix"] or "use an allowed value")
                continue
        values[key] = converted
    return cls(**values)
