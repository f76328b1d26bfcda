"""Dataset shapes for chat fine-tuning, matching Unsloth's `standardize_data_formats` / `standardize_sharegpt`,
`to_sharegpt` and the notebooks' `formatting_prompts_func` (here `apply_chat_template`).

Each function takes a `datasets.Dataset` (or `DatasetDict`, split by split) or a plain list of dict rows and returns
the same kind. Conversations are lists of messages: ShareGPT `{"from": "human", "value": ...}` or standard
`{"role": "user", "content": ...}`.
"""
from __future__ import annotations

import random
import re
from typing import Any, Callable, Sequence

from fastlm.errors import ConfigError, Problem, ProblemList
from fastlm.training.chat_templates import build_chat_template

DEFAULT_SYSTEM_ALIASES = ("system",)
DEFAULT_USER_ALIASES = ("user", "human", "input")
DEFAULT_ASSISTANT_ALIASES = ("gpt", "assistant", "output", "model")
CONVERSATION_COLUMNS = ("conversations", "messages")
_ROLE_KEYS = ("role", "from")
_CONTENT_KEYS = ("content", "value", "text")


def _is_dataset(data) -> bool:
    return hasattr(data, "map") and hasattr(data, "column_names")


def _per_split(data, fn: Callable):
    """Applies fn to each split of a DatasetDict, or to data itself."""
    if _is_dataset(data) and isinstance(data.column_names, dict):
        return type(data)({split: fn(part) for split, part in data.items()})
    return fn(data)


def _columns(data) -> list[str]:
    if _is_dataset(data):
        return list(data.column_names or [])
    if isinstance(data, Sequence) and not isinstance(data, str):
        return list(data[0]) if len(data) and isinstance(data[0], dict) else []
    raise ConfigError("dataset", [Problem("dataset", type(data).__name__, "a datasets.Dataset, DatasetDict or a "
                                          "list of dict rows", "load it with datasets.load_dataset(...)")])


def _first_row(data) -> dict:
    return dict(next(iter(data))) if len(data) else {}


def _find_conversation_column(data, conversation_column: str | None, context: str) -> str:
    columns = _columns(data)
    if conversation_column is not None:
        if conversation_column in columns:
            return conversation_column
        raise ConfigError(context, [Problem("conversation_column", conversation_column, f"the dataset's columns are "
                                            f"{columns}", "pass one of them")])
    for name in CONVERSATION_COLUMNS:
        if name in columns:
            return name
    first = _first_row(data)
    for name, value in first.items():  # any column holding a list of message dicts
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return name
    raise ConfigError(context, [Problem("dataset", columns, "a column of conversations (lists of messages), "
                                        "named 'conversations' or 'messages'", "for instruction/input/output "
                                        "columns, call to_sharegpt(dataset, merged_prompt=...) first")])


def _message_keys(conversations: Sequence, context: str) -> tuple[str, str]:
    """(role key, content key) used by the messages, e.g. ("from", "value") for ShareGPT."""
    keys: set[str] = set()
    for conversation in conversations:
        for message in conversation or []:
            keys |= {k for k, v in message.items() if v is not None}
        if keys:
            break
    role = next((k for k in _ROLE_KEYS if k in keys), None)
    content = next((k for k in _CONTENT_KEYS if k in keys), None)
    if role is None or content is None:
        raise ConfigError(context, [Problem("message keys", sorted(keys), f"a role key (one of {list(_ROLE_KEYS)}) "
                                            f"and a content key (one of {list(_CONTENT_KEYS)})",
                                            "rename the message fields, e.g. to 'from'/'value' or 'role'/'content'")])
    return role, content


class _RoleMap:
    """Maps role aliases (case-insensitive) to system/user/assistant; unknown roles raise a ConfigError."""

    def __init__(self, system: Sequence[str], user: Sequence[str], assistant: Sequence[str]):
        self.aliases = {"system": list(system), "user": list(user), "assistant": list(assistant)}
        self.table = {alias.strip().lower(): role for role, names in self.aliases.items() for alias in names}

    def __call__(self, name, where: str) -> str:
        role = self.table.get(str(name).strip().lower())
        if role is None:
            allowed = "; ".join(f"{role} <- {names}" for role, names in self.aliases.items())
            raise ConfigError("standardize_data_formats", [Problem(
                f"role in {where}", name, f"known role names are {allowed}",
                f"add it to the matching list, e.g. aliases_for_user=[..., {name!r}] or "
                f"aliases_for_assistant=[..., {name!r}]")])
        return role

    def standard(self, conversation) -> bool:
        return all(m.get("role") in self.aliases for m in conversation or [])


def _convert(conversation, keys: tuple[str, str], roles: _RoleMap, where: str) -> list[dict]:
    role_key, content_key = keys
    out = []
    for i, message in enumerate(conversation or []):
        role = message.get(role_key)
        if role is None:  # a mixed dataset: fall back to the other spelling
            role = message.get("role", message.get("from"))
        content = message.get(content_key)
        if content is None:
            content = next((message[k] for k in _CONTENT_KEYS if message.get(k) is not None), "")
        out.append({"role": roles(role, f"{where}, message {i}"), "content": content})
    return out


def standardize_data_formats(dataset, tokenizer=None, aliases_for_system: Sequence[str] = DEFAULT_SYSTEM_ALIASES,
                             aliases_for_user: Sequence[str] = DEFAULT_USER_ALIASES,
                             aliases_for_assistant: Sequence[str] = DEFAULT_ASSISTANT_ALIASES,
                             num_proc: int | None = None):
    """ShareGPT conversations -> role/content messages (Unsloth's `standardize_data_formats`).

    Finds the conversation column (`conversations`, else `messages`, else the first column of message lists) and
    rewrites every message `{"from": "human", "value": "Hi"}` as `{"role": "user", "content": "Hi"}`, keeping the
    column's name and the other columns. Role names are matched case-insensitively against the alias lists; a role
    in none of them raises a ConfigError naming the row, the role and the lists. Data whose messages are already
    role/content with system/user/assistant roles is returned unchanged (the same object). With a `tokenizer`, the
    first standardized conversation is rendered by its chat template, so a template that cannot take these roles
    (e.g. one that refuses a system turn) fails here, with the row, instead of in the middle of training.
    """
    roles = _RoleMap(aliases_for_system, aliases_for_user, aliases_for_assistant)

    def one(data):
        column = _find_conversation_column(data, None, "standardize_data_formats")
        conversations = data[column] if _is_dataset(data) else [row[column] for row in data]
        keys = _message_keys(conversations[:100], "standardize_data_formats")
        if keys == ("role", "content") and all(roles.standard(c) for c in conversations):
            out = data
        elif not _is_dataset(data):
            out = [{**row, column: _convert(row[column], keys, roles, f"row {i}")} for i, row in enumerate(data)]
        else:
            out = data.map(lambda row, i: {column: _convert(row[column], keys, roles, f"row {i}")},
                           with_indices=True, num_proc=num_proc, desc="Standardizing conversations")
        if tokenizer is not None:
            _check_template_renders(tokenizer, _first_row(out)[column])
        return out

    return _per_split(dataset, one)


def _check_template_renders(tokenizer, conversation) -> None:
    if not getattr(tokenizer, "chat_template", None):
        return
    try:
        tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - any template failure is reported with the row
        p = ProblemList("standardize_data_formats")
        p.add("tokenizer", type(tokenizer).__name__, f"its chat template cannot render row 0 of the standardized "
              f"data ({type(exc).__name__}: {exc})", "install a template that takes these roles with "
              "get_chat_template(tokenizer, ...), or fix the data's roles")
        p.raise_if_any()


def _tokenizer_adds_bos(tokenizer) -> bool:
    """True when encoding text already prepends bos_token (so a template's leading bos would be doubled)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos_id and without[:1] != [bos_id]


def apply_chat_template(dataset, tokenizer, chat_template=None, conversation_column: str | None = None,
                        remove_conversation_column: bool | None = None, num_proc: int | None = None):
    """Adds a `text` column: each conversation rendered by the chat template, without a generation prompt.

    Matches the `formatting_prompts_func` of Unsloth's notebooks (`tokenizer.apply_chat_template(convo,
    tokenize=False, add_generation_prompt=False)`), including their `.removeprefix('<bos>')`: when the tokenizer
    adds bos_token itself on encoding, a leading bos_token is stripped from the text so training does not see two.

    chat_template: None uses `tokenizer.chat_template`; a name, Jinja string or (Jinja, eos) tuple renders with
        that template without changing the tokenizer (use `get_chat_template` to install one for good).
    conversation_column: default `conversations`, else `messages`. ShareGPT messages are converted on the fly
        with the default role aliases (call `standardize_data_formats` first for custom aliases).
    remove_conversation_column: None drops the column only when it is named `messages`, because TRL's SFTTrainer
        trains on a role/content `messages` column in preference to `text`.
    """
    if chat_template is None:
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ConfigError("apply_chat_template", [Problem(
                "tokenizer.chat_template", None, "a tokenizer with a chat template, or chat_template=<name>",
                "call get_chat_template(tokenizer, 'chatml') first, or pass chat_template='chatml'")])
    else:
        source, _ = build_chat_template(chat_template)
    strip_bos = tokenizer.bos_token if _tokenizer_adds_bos(tokenizer) else None
    roles = _RoleMap(DEFAULT_SYSTEM_ALIASES, DEFAULT_USER_ALIASES, DEFAULT_ASSISTANT_ALIASES)

    def render(conversation, where: str) -> str:
        messages = conversation or []
        keys = _message_keys([messages], "apply_chat_template") if messages else ("role", "content")
        if keys != ("role", "content") or not roles.standard(messages):
            messages = _convert(messages, keys, roles, where)
        else:
            messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                 chat_template=source)
        except Exception as exc:  # noqa: BLE001 - a template failure is reported with its row
            raise ConfigError("apply_chat_template", [Problem(
                where, messages, f"a conversation the chat template can render ({type(exc).__name__}: {exc})",
                "fix this row's roles and order (many templates need user/assistant turns alternating), or "
                "install a template that takes them with get_chat_template(tokenizer, ...)")]) from exc
        if strip_bos and text.startswith(strip_bos):
            text = text[len(strip_bos):]
        return text

    def one(data):
        column = _find_conversation_column(data, conversation_column, "apply_chat_template")
        drop = column == "messages" if remove_conversation_column is None else remove_conversation_column
        if not _is_dataset(data):
            rows = [{**row, "text": render(row[column], f"row {i}")} for i, row in enumerate(data)]
            return [{k: v for k, v in row.items() if not (drop and k == column)} for row in rows]

        def batch(rows, indices):
            return {"text": [render(c, f"row {i}") for c, i in zip(rows[column], indices)]}

        return data.map(batch, batched=True, with_indices=True, num_proc=num_proc,
                        remove_columns=[column] if drop else None, desc="Applying chat template")

    return _per_split(dataset, one)


_PROMPT_TOKEN = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{[^{}]*\}")


def _parse_prompt(prompt: str, problems: ProblemList) -> list:
    """merged_prompt -> segments: str (text), ("col", name), ("opt", [segments]). `{{`/`}}` are literal braces."""
    top: list = []
    current = top
    pos = 0
    for match in _PROMPT_TOKEN.finditer(prompt):
        if match.start() > pos:
            current.append(prompt[pos:match.start()])
        token = match.group()
        pos = match.end()
        if token in ("{{", "}}"):
            current.append(token[0])
        elif token == "[[":
            if current is not top:
                problems.add("merged_prompt", prompt, "optional sections [[...]] cannot nest",
                             "close the first [[ with ]] before opening another")
                return top
            section: list = []
            top.append(("opt", section))
            current = section
        elif token == "]]":
            if current is top:
                problems.add("merged_prompt", prompt, "a ]] with no [[ before it", "remove it or add the [[")
                return top
            current = top
        else:
            name = token[1:-1].strip()
            if not name:
                problems.add("merged_prompt", prompt, "{} must name a column, like {instruction}",
                             "write the column name inside the braces, or {{ }} for literal braces")
            current.append(("col", name))
    if pos < len(prompt):
        current.append(prompt[pos:])
    if current is not top:
        problems.add("merged_prompt", prompt, "an optional section [[... has no closing ]]", "add the ]]")
    return top


def _prompt_columns(segments: list) -> list[str]:
    names: list[str] = []
    for seg in segments:
        if isinstance(seg, tuple):
            names += [seg[1]] if seg[0] == "col" else _prompt_columns(seg[1])
    return names


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _render_prompt(segments: list, row: dict) -> str:
    out = []
    for seg in segments:
        if isinstance(seg, str):
            out.append(seg)
        elif seg[0] == "col":
            value = row[seg[1]]
            out.append("" if value is None else str(value))
        elif not any(_is_empty(row[name]) for name in _prompt_columns(seg[1])):
            out.append(_render_prompt(seg[1], row))
    return "".join(out)


def to_sharegpt(dataset, merged_prompt: str = "{instruction}[[\nYour input is:\n{input}]]",
                merged_column_name: str = "instruction", output_column_name: str = "output",
                remove_unused_columns: bool = True, conversation_extension: int = 1, random_state: int = 3407):
    """Instruction/input/output columns -> a ShareGPT `conversations` column (Unsloth's `to_sharegpt`).

    merged_prompt: `{column}` inserts that column's value; `[[...]]` is an optional section, dropped for a row
        where any column named inside it is empty (None or blank); `{{`/`}}` write literal braces.
    The human turn is the merged prompt, the gpt turn the `output_column_name` column:
        `[{"from": "human", "value": prompt}, {"from": "gpt", "value": output}]`.
    merged_column_name: with remove_unused_columns=False, the merged prompt is also stored in this column.
    conversation_extension: N > 1 appends the turns of N-1 other rows (drawn at random with seed `random_state`)
        to every row, making multi-turn conversations; the number of rows stays the same.
    Every problem (a prompt column or the output column missing, a bad section) is reported at once, with the
    dataset's columns.
    """
    problems = ProblemList("to_sharegpt")
    segments = _parse_prompt(merged_prompt, problems) if isinstance(merged_prompt, str) else []
    columns = _columns(dataset if not (_is_dataset(dataset) and isinstance(dataset.column_names, dict))
                       else next(iter(dataset.values())))
    used = _prompt_columns(segments)
    if isinstance(merged_prompt, str) and not used and not problems.problems:
        problems.add("merged_prompt", merged_prompt, "a prompt naming at least one column in braces",
                     f"e.g. '{{instruction}}'; the dataset's columns are {columns}")
    for name in dict.fromkeys(used):
        if name and name not in columns:
            problems.add("merged_prompt", f"{{{name}}}", f"a column of the dataset; its columns are {columns}",
                         "use one of these names in merged_prompt, or add the column")
    if output_column_name not in columns:
        problems.add("output_column_name", output_column_name, f"the dataset's columns are {columns}",
                     "pass the column holding the answers")
    if not isinstance(conversation_extension, int) or conversation_extension < 1:
        problems.add("conversation_extension", conversation_extension, "an integer >= 1",
                     "use 1 for single-turn conversations, N > 1 to merge N rows into one conversation")
    problems.raise_if_any()

    def make(row: dict) -> dict[str, Any]:
        prompt = _render_prompt(segments, row)
        output = row[output_column_name]
        conversation = [{"from": "human", "value": prompt},
                        {"from": "gpt", "value": "" if output is None else str(output)}]
        return {"conversations": conversation} if remove_unused_columns else \
            {merged_column_name: prompt, "conversations": conversation}

    def extend(conversations: list) -> list:
        n = len(conversations)
        rng = random.Random(random_state)
        out = []
        for i in range(n):
            merged = list(conversations[i])
            for _ in range(conversation_extension - 1):
                j = rng.randrange(n - 1) if n > 1 else 0
                merged += conversations[j + (n > 1 and j >= i)]  # another row, never row i itself
            out.append(merged)
        return out

    def one(data):
        if not _is_dataset(data):
            rows = [make(row) if remove_unused_columns else {**row, **make(row)} for row in data]
            if conversation_extension > 1:
                for row, conversation in zip(rows, extend([r["conversations"] for r in rows])):
                    row["conversations"] = conversation
            return rows
        out = data.map(make, remove_columns=list(data.column_names) if remove_unused_columns else None,
                       desc="Merging columns into conversations")
        if conversation_extension > 1:
            merged = extend(out["conversations"])
            if out.column_names == ["conversations"]:
                out = type(out).from_dict({"conversations": merged}, features=out.features)
            else:
                out = out.remove_columns("conversations").add_column("conversations", merged)
        return out

    return _per_split(dataset, one)
