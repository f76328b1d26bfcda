"""Checks of `from_pretrained(rope_scaling=...)` per RoPE type, before any weight is read.

transformers only logs a warning for a bad factor (a linear factor of 0 then gives NaN logits) and raises a bare
`KeyError` for a missing key or an unknown type; here each problem names the key, what is allowed and the fix.
`original_max_position_embeddings` and `rope_theta` are filled in from the model's config when left out.
"""
from __future__ import annotations

from ..errors import ProblemList
from ..utils.checks import is_finite_number

# rope_type -> (keys the user must give, keys the user may give)
_FROM_CONFIG = {"rope_theta", "original_max_position_embeddings", "partial_rotary_factor"}
ROPE_TYPES: dict[str, tuple[set[str], set[str]]] = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor"}, {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": ({"short_factor", "long_factor"}, {"factor", "attention_factor"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor"}, set()),
}
EXAMPLE = "{'rope_type': 'linear', 'factor': 2.0}"


def check_rope_scaling(rope_scaling, p: ProblemList) -> None:
    """Adds a problem to `p` for each invalid part of `rope_scaling` (None is valid: no scaling asked)."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        p.add("rope_scaling", rope_scaling, f"None or a dict such as {EXAMPLE}", "pass a dict or None")
        return
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind not in ROPE_TYPES:
        p.add("rope_scaling['rope_type']", kind, "one of " + ", ".join(ROPE_TYPES), f"e.g. rope_scaling={EXAMPLE}")
        return
    required, optional = ROPE_TYPES[kind]
    name = "rope_scaling"
    missing = sorted(required - set(rope_scaling))
    if missing:
        p.add(name, rope_scaling, f"rope_type {kind!r} needs the keys {sorted(required)}",
              f"add {', '.join(repr(k) for k in missing)}")
    unknown = sorted(set(rope_scaling) - required - optional - _FROM_CONFIG - {"rope_type", "type"})
    if unknown:
        p.add(name, rope_scaling, f"rope_type {kind!r} takes the keys {sorted(required | optional | _FROM_CONFIG)}",
              f"remove or fix the spelling of {', '.join(repr(k) for k in unknown)}")
    for key in ("factor", "attention_factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "rope_theta"):
        if key not in rope_scaling:
            continue
        value = rope_scaling[key]
        if key == "factor" and not (is_finite_number(value) and value >= 1):
            p.add("rope_scaling['factor']", value, "a finite number >= 1 (the context is stretched by this "
                  "factor)", "e.g. factor=2.0 for twice the model's context")
        elif key != "factor" and not (is_finite_number(value) and value > 0):
            p.add(f"rope_scaling[{key!r}]", value, "a finite positive number", f"fix {key} or leave it out")
    if kind == "llama3" and all(is_finite_number(rope_scaling.get(k)) for k in ("low_freq_factor",
                                                                                "high_freq_factor")):
        if rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
            p.add("rope_scaling['high_freq_factor']", rope_scaling["high_freq_factor"],
                  f"greater than low_freq_factor ({rope_scaling['low_freq_factor']})",
                  "e.g. low_freq_factor=1.0, high_freq_factor=4.0")
    for key in ("short_factor", "long_factor"):
        if key in rope_scaling:
            value = rope_scaling[key]
            if not (isinstance(value, (list, tuple)) and value and all(is_finite_number(v) and v > 0
                                                                       for v in value)):
                p.add(f"rope_scaling[{key!r}]", value, "a non-empty list of finite positive numbers (one per "
                      "rotary frequency, head_dim / 2 of them)", "copy the lists from the model's longrope config")
    omp = rope_scaling.get("original_max_position_embeddings")
    if omp is not None and (not isinstance(omp, int) or isinstance(omp, bool) or omp <= 0):
        p.add("rope_scaling['original_max_position_embeddings']", omp, "a positive integer",
              "leave it out to use the model's max_position_embeddings")
