"""Errors fastlm raises. Every message names the bad value, what is allowed, and the fix."""
from __future__ import annotations

from dataclasses import dataclass, field


class FastLMError(Exception):
    """Base class of fastlm's own errors."""


@dataclass(frozen=True)
class Problem:
    """One invalid argument: which one, what it was, what is allowed, and how to fix it."""

    name: str
    value: object
    allowed: str
    fix: str

    def __str__(self) -> str:
        return f"- {self.name}={self.value!r}: {self.allowed}. Fix: {self.fix}"


class ConfigError(FastLMError, ValueError):
    """Several invalid arguments, reported together before any work is done."""

    def __init__(self, context: str, problems: list[Problem]):
        self.context = context
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{context}: {n} problem{'s' if n != 1 else ''} found"
        super().__init__(head + "\n" + "\n".join(str(p) for p in self.problems))


@dataclass
class ProblemList:
    """Collects problems so that all of them are reported at once."""

    context: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, name: str, value: object, allowed: str, fix: str) -> None:
        self.problems.append(Problem(name, value, allowed, fix))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.context, self.problems)


class MissingDependencyError(FastLMError, ImportError):
    """An optional stack is needed but not installed."""

    def __init__(self, package: str, needed_for: str, install: str):
        super().__init__(f"{needed_for} needs the package {package!r}, which is not installed. "
                         f"Install it with: {install}")


class ModelSourceError(FastLMError, OSError):
    """A model name could not be resolved to files."""


class UnsupportedFeatureError(FastLMError, NotImplementedError):
    """An argument whose feature is not available in this fastlm version or on this machine."""


def first_line(exc: BaseException) -> str:
    """The exception's first line, with the next one where it only announces it (dynamo's "backend=... raised:")."""
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return text[:200]
