"""Checks of training data that name the file and the line or row of every problem, run before any model loads
(and by ``fastlm train --dry-run``).

`scan_text_file` reads a local .jsonl/.json/.csv/.txt file itself before `datasets` does: bytes that are not UTF-8
and lines that are not JSON objects are reported with their line number (pyarrow would say only
"UnicodeDecodeError" or "DatasetGenerationError"). It returns the line number of each record, so that
`check_rows` can say "row 7 (line 9 of data.jsonl)" for a record whose `messages` is missing or malformed.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, Problem

MAX_REPORTED = 5
CONTEXT = "fastlm train data"


def _problem(where: str, value, allowed: str, fix: str) -> Problem:
    return Problem(where, value, allowed, fix)


def _raise(problems: list[Problem], more: int = 0) -> None:
    if more:
        problems.append(_problem("data", f"{more} more", "the same kind of problem in further rows",
                                 "fix the rows above, then run --dry-run again"))
    raise ConfigError(CONTEXT, problems)


def scan_text_file(path: Path) -> list[int] | None:
    """Line number (1-based) of every record of a JSON-lines / JSON-array / CSV / text file, or None where rows
    do not map to lines (a JSON array). Raises `ConfigError` naming the file and lines that are not UTF-8 or not
    valid JSON objects."""
    suffix = path.suffix.lower()
    problems: list[Problem] = []
    more = 0
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if len(problems) < MAX_REPORTED:
                problems.append(_problem(f"{path}:{number}", line[max(0, exc.start - 10):exc.end + 10],
                                         f"UTF-8 text (byte {exc.start + 1} of line {number} is not UTF-8)",
                                         "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 "
                                         f"{path.name} > fixed{path.suffix}"))
            else:
                more += 1
    if problems:
        _raise(problems, more)
    if suffix not in (".json", ".jsonl"):
        return [n for n, line in enumerate(lines, start=1) if line.strip()] if suffix == ".txt" else None
    if suffix == ".json" and raw.lstrip()[:1] == b"[":
        try:
            rows = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as exc:
            _raise([_problem(f"{path}:{exc.lineno}", exc.msg, "a valid JSON array of objects",
                             f"fix the JSON at line {exc.lineno}, column {exc.colno}")])
        bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
        if bad:
            _raise([_problem(f"{path} row {i}", rows[i], "a JSON object per row", "make every element an object")
                    for i in bad[:MAX_REPORTED]], max(0, len(bad) - MAX_REPORTED))
        return None
    record_lines = []
    for number, line in enumerate(lines, start=1):
        text = line.decode("utf-8").strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            if len(problems) < MAX_REPORTED:
                problems.append(_problem(f"{path}:{number}", text[:60] + ("..." if len(text) > 60 else ""),
                                         f"one JSON object per line ({exc.msg} at column {exc.colno})",
                                         f"fix line {number}"))
            else:
                more += 1
            continue
        if not isinstance(record, dict):
            if len(problems) < MAX_REPORTED:
                problems.append(_problem(f"{path}:{number}", text[:60], "a JSON object ({...}) per line",
                                         f"wrap line {number} in an object, e.g. {{\"text\": ...}}"))
            else:
                more += 1
            continue
        record_lines.append(number)
    if problems:
        _raise(problems, more)
    return record_lines


def _where(row: int, source: str, lines: list[int] | None) -> str:
    if lines is not None and row < len(lines):
        return f"{source}:{lines[row]} (row {row})"
    return f"{source} row {row}"


def _message_problem(value, role_key: str, content_key: str) -> str | None:
    """Why `value` is not a conversation (a non-empty list of {role_key, content_key} dicts), or None."""
    if value is None:
        return "the conversation is missing"
    if not isinstance(value, list) or not value:
        return "the conversation must be a non-empty list of messages"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        role, content = message.get(role_key), message.get(content_key)
        if not isinstance(role, str) or not role:
            return f"message {i} has no {role_key!r}"
        if content is None or (not isinstance(content, (str, list))):
            return f"message {i} has no {content_key!r} text"
    return None


def _text_problem(value) -> str | None:
    if value is None:
        return "the value is missing"
    if not isinstance(value, str):
        return f"a {type(value).__name__}, not text"
    return None


def check_rows(dataset, fmt: str, columns: dict, source: str, lines: list[int] | None) -> None:
    """Every row of `dataset` has what `fmt` needs (columns: format role -> column name). Raises `ConfigError`
    naming the file, line and row of up to MAX_REPORTED bad rows."""
    checks = []
    if fmt in ("messages", "sharegpt"):
        keys = ("role", "content") if fmt == "messages" else ("from", "value")
        checks.append((columns["conversation"], lambda v, k=keys: _message_problem(v, *k),
                       f"a list of {{{keys[0]!r}, {keys[1]!r}}} messages"))
    elif fmt == "instruction":
        checks += [(columns["instruction"], _text_problem, "text"), (columns["output"], _text_problem, "text")]
    elif fmt == "text":
        checks.append((columns["text"], _text_problem, "text"))
    elif fmt in ("prompt_completion", "unpaired_preference", "prompt", "preference"):
        names = {"prompt_completion": ("prompt", "completion"), "unpaired_preference": ("prompt", "completion"),
                 "prompt": ("prompt",), "preference": ("chosen", "rejected")}[fmt]
        for name in names:
            checks.append((name, lambda v: None if isinstance(v, (str, list)) else
                           ("the value is missing" if v is None else f"a {type(v).__name__}, not text or messages"),
                           "text or a list of messages"))
    problems: list[Problem] = []
    more = 0
    for column, check, allowed in checks:
        if column not in dataset.column_names:
            continue
        for row, value in enumerate(dataset[column]):
            why = check(value)
            if why is None:
                continue
            if len(problems) < MAX_REPORTED:
                shown = value if value is None or len(repr(value)) <= 80 else repr(value)[:77] + "..."
                problems.append(_problem(f"{_where(row, source, lines)} {column}", shown, f"{allowed} ({why})",
                                         "fix or remove this row"))
            else:
                more += 1
    if problems:
        _raise(problems, more)
