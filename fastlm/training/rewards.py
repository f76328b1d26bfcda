"""Named reward functions for GRPO (`trainer.reward_functions` in a `fastlm train` config).

Each follows TRL's reward-function contract: ``fn(completions, prompts=None, **columns) -> list[float]``, where a
completion is a string (standard prompts) or a list of one assistant message (conversational prompts), and every
other dataset column (e.g. ``answer``) arrives as a keyword argument holding one value per completion.

Built in: ``exact_match`` and ``contains_answer`` (against the ``answer`` / ``solution`` / ``output`` column),
``think_format`` (``<think>...</think>`` then an answer), ``concise`` (shorter is better, 0..1) and
``no_repetition`` (penalises repeated 3-grams). Any other function is named as ``package.module:function``.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

__all__ = ["REWARD_FUNCTIONS", "get_reward_function", "check_reward_function"]

ANSWER_COLUMNS = ("answer", "solution", "output", "reference")


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _answers(kwargs: dict, n: int) -> list[str | None]:
    for column in ANSWER_COLUMNS:
        if kwargs.get(column) is not None:
            return [None if a is None else str(a) for a in kwargs[column]]
    return [None] * n


def _normalize(text: str) -> str:
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    return " ".join(text.lower().strip().rstrip(".!").split())


def exact_match(completions, **kwargs) -> list[float]:
    """1.0 when the completion (case and spacing ignored, any <think> block removed) equals the answer column."""
    answers = _answers(kwargs, len(completions))
    return [float(a is not None and _normalize(_text(c)) == _normalize(a)) for c, a in zip(completions, answers)]


def contains_answer(completions, **kwargs) -> list[float]:
    """1.0 when the answer column appears in the completion (case-insensitive)."""
    answers = _answers(kwargs, len(completions))
    return [float(a is not None and _normalize(a) in _normalize(_text(c))) for c, a in zip(completions, answers)]


_THINK = re.compile(r"^\s*<think>(?!.*<think>).*?</think>\s*\S", re.DOTALL)


def think_format(completions, **kwargs) -> list[float]:
    """1.0 when the completion is one ``<think>...</think>`` block followed by an answer."""
    return [float(bool(_THINK.match(_text(c)))) for c in completions]


def concise(completions, target_chars: int = 200, **kwargs) -> list[float]:
    """1.0 up to ``target_chars`` characters, then falling linearly to 0 at twice that."""
    out = []
    for c in completions:
        n = len(_text(c))
        out.append(1.0 if n <= target_chars else max(0.0, 2.0 - n / target_chars))
    return out


def no_repetition(completions, **kwargs) -> list[float]:
    """0 minus the fraction of repeated word 3-grams (0.0 for no repetition, down to -1.0)."""
    out = []
    for c in completions:
        words = _text(c).split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out


REWARD_FUNCTIONS: dict[str, Callable] = {"exact_match": exact_match, "contains_answer": contains_answer,
                                         "think_format": think_format, "concise": concise,
                                         "no_repetition": no_repetition}


def _import(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"{name} is not callable")
    return fn


def check_reward_function(name: str) -> str | None:
    """None when `name` resolves to a reward function, else the reason it does not."""
    if name in REWARD_FUNCTIONS:
        return None
    if ":" not in name:
        return f"not a built-in reward function ({', '.join(REWARD_FUNCTIONS)}) nor 'package.module:function'"
    try:
        _import(name)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        return f"could not be imported ({type(exc).__name__}: {exc})"
    return None


def get_reward_function(name: str) -> Callable:
    """The function for a built-in name or a ``package.module:function`` path (checked by the config first)."""
    fn = REWARD_FUNCTIONS.get(name) or _import(name)
    if not getattr(fn, "__name__", None):  # TRL logs rewards by function name
        fn.__name__ = name
    return fn
