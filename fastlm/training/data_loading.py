"""Training data for `fastlm train`: load a local file, a bundled or a Hugging Face dataset, detect its format and
turn it into the columns the chosen TRL trainer reads.

Formats (``data.format``, detected from the columns when ``auto``):

==================== ======================================= ============================================
format               columns                                 trainers
==================== ======================================= ============================================
messages             messages/conversations: role/content    sft (chat template -> text), grpo (prompt)
sharegpt             conversations: from/value               sft, grpo (standardized to messages first)
instruction          instruction, [input], output            sft (to_sharegpt), grpo
text                 text (``data.text_field``)               sft
prompt_completion    prompt, completion                      sft (TRL trains on the completion)
preference           [prompt], chosen, rejected              dpo, orpo, kto (unpaired for kto)
unpaired_preference  prompt, completion, label               kto
prompt               prompt, [answer ...]                    grpo (other columns reach the reward functions)
==================== ======================================= ============================================

Loading and the format check run before the model is loaded (`load_training_data`); rendering conversations with
the chat template needs the tokenizer and runs after (`format_for_trainer`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, Problem, ProblemList
from .data_checks import check_rows, scan_text_file
from .config import BUNDLED_PREFIX, FORMATS_FOR_TRAINER, DataSection, TrainConfig, resolve_data_path

logger = logging.getLogger(__name__)

__all__ = ["TrainingData", "load_training_data", "load_raw_dataset", "detect_format", "format_for_trainer"]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
CONVERSATION_COLUMNS = ("messages", "conversations")
REQUIRED_COLUMNS = {
    "messages": "a 'messages' or 'conversations' column of role/content message lists",
    "sharegpt": "a 'conversations' column of from/value message lists",
    "instruction": "'instruction' and output columns (and optionally 'input')",
    "text": "a text column",
    "prompt_completion": "'prompt' and 'completion' columns",
    "preference": "'chosen' and 'rejected' columns (and usually 'prompt')",
    "unpaired_preference": "'prompt', 'completion' and 'label' columns",
    "prompt": "a 'prompt' column",
}


@dataclass
class TrainingData:
    """Loaded data, its detected format, and the trainer-ready train/eval datasets before chat templating."""

    train: Any
    eval: Any
    format: str
    source: str


def _mk(name, value, allowed, fix) -> list[Problem]:
    return [Problem(name, value, allowed, fix)]


def load_raw_dataset(data: DataSection, base_dir: str | None = None):
    """The dataset named by ``data.path`` (one split, a `datasets.Dataset`)."""
    import datasets

    context = "fastlm train data"
    local = resolve_data_path(data.path, base_dir)
    try:
        if local is not None and local.is_dir():
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(local))
                if isinstance(loaded, datasets.DatasetDict):
                    split = data.split.split("[")[0]
                    if split not in loaded:
                        raise ConfigError(context, _mk("data.split", data.split, f"the splits of {local} are "
                                                       f"{list(loaded)}", "pick one of them"))
                    loaded = loaded[split]
                return loaded
            return datasets.load_dataset(str(local), data.subset, split=data.split)
        if local is not None:
            scan_text_file(local)
            builder = _BUILDERS[local.suffix.lower()]
            split = data.split if data.split.startswith("train") else "train"
            return datasets.load_dataset(builder, data_files={"train": str(local)}, split=split)
        return datasets.load_dataset(data.path, data.subset, split=data.split)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean "could not load"
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if local is None and not data.path.startswith(BUNDLED_PREFIX):
            fix = ("check the name, split and subset; offline, download it where there is network and pass the "
                   "local file or saved directory")
        else:
            fix = "check that the file is valid JSON lines / CSV / parquet with one record per row"
        raise ConfigError(context, _mk("data.path", data.path, f"a loadable dataset (loading failed: {what})",
                                       fix)) from exc


def _message_keys(value) -> set[str]:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return set(value[0])
    return set()


def detect_format(columns: list[str], first_row: dict, data: DataSection) -> str | None:
    """The format of a dataset with these columns (see the module table), or None when none fits."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired_preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    for column in CONVERSATION_COLUMNS:
        if column in cols:
            keys = _message_keys(first_row.get(column))
            if {"from", "value"} <= keys:
                return "sharegpt"
            if {"role", "content"} <= keys:
                return "messages"
    if "instruction" in cols and data.output_field in cols:
        return "instruction"
    if data.text_field in cols:
        return "text"
    if "prompt" in cols:
        return "prompt"
    return None


def _has_columns(fmt: str, columns: list[str], first_row: dict, data: DataSection) -> bool:
    cols = set(columns)
    return {
        "messages": any(c in cols and {"role", "content"} <= _message_keys(first_row.get(c))
                        for c in CONVERSATION_COLUMNS),
        "sharegpt": any(c in cols and {"from", "value"} <= _message_keys(first_row.get(c))
                        for c in CONVERSATION_COLUMNS),
        "instruction": {"instruction", data.output_field} <= cols,
        "text": data.text_field in cols,
        "prompt_completion": {"prompt", "completion"} <= cols,
        "preference": {"chosen", "rejected"} <= cols,
        "unpaired_preference": {"prompt", "completion", "label"} <= cols,
        "prompt": "prompt" in cols,
    }[fmt]


def load_training_data(config: TrainConfig) -> TrainingData:
    """Loads ``config.data``, checks its format against the trainer and converts what needs no tokenizer
    (preference -> unpaired for KTO, conversations -> prompt + answer for GRPO). Raises `ConfigError` naming the
    columns found and what the trainer needs. Runs before the model is loaded."""
    data, trainer = config.data, config.trainer.type
    context = "fastlm train data"
    dataset = load_raw_dataset(data, config.base_dir)
    columns = list(dataset.column_names)
    p = ProblemList(context)
    if len(dataset) == 0:
        p.add("data.path", data.path, "a dataset with at least one row", "check the file or the split")
        p.raise_if_any()
    first = _first_values(dataset)
    fmt = data.format
    if fmt == "auto":
        fmt = detect_format(columns, first, data)
        if fmt is None:
            needs = "; ".join(f"{f}: {REQUIRED_COLUMNS[f]}" for f in FORMATS_FOR_TRAINER[trainer])
            p.add("data.format", "auto", f"a format the {trainer} trainer reads ({needs}); the dataset's columns "
                  f"are {columns}", "rename the columns, or set data.format and data.text_field / "
                  "data.output_field")
    elif not _has_columns(fmt, columns, first, data):
        p.add("data.format", fmt, f"{REQUIRED_COLUMNS[fmt]}; the dataset's columns are {columns}",
              "use data.format: auto, or rename the columns")
    if fmt is not None and fmt not in FORMATS_FOR_TRAINER[trainer] and not p.problems:
        p.add("data.format", fmt, f"the {trainer} trainer trains on {FORMATS_FOR_TRAINER[trainer]}; the "
              f"dataset's columns are {columns}", f"use a {FORMATS_FOR_TRAINER[trainer][0]} dataset with this "
              "trainer, or another trainer")
    p.raise_if_any()

    if data.max_samples is not None and data.max_samples < len(dataset):
        dataset = dataset.select(range(data.max_samples))
    local = resolve_data_path(data.path, config.base_dir)
    lines = scan_text_file(local) if local is not None and local.is_file() else None
    check_rows(dataset, fmt, _format_columns(fmt, dataset.column_names, data), str(local or data.path), lines)
    dataset = _convert_without_tokenizer(dataset, fmt, trainer, data)
    eval_dataset = None
    if data.eval_fraction > 0:
        if len(dataset) < 2:
            raise ConfigError(context, _mk("data.eval_fraction", data.eval_fraction, "a dataset of at least 2 rows "
                                           "to split", "use data.eval_fraction: 0"))
        split = dataset.train_test_split(test_size=data.eval_fraction, seed=data.seed)
        dataset, eval_dataset = split["train"], split["test"]
    logger.info("fastlm: %d training rows (%s format) from %s", len(dataset), fmt, data.path)
    return TrainingData(dataset, eval_dataset, fmt, data.path)


def _first_values(dataset, limit: int = 1000) -> dict:
    """For each column, its first non-null value among the first `limit` rows (so that a first row with a missing
    value does not hide the format)."""
    head = dataset.select(range(min(limit, len(dataset))))
    return {c: next((v for v in head[c] if v is not None), None) for c in dataset.column_names}


def _format_columns(fmt: str, columns: list[str], data: DataSection) -> dict:
    conversation = next((c for c in CONVERSATION_COLUMNS if c in columns), "messages")
    return {"conversation": conversation, "instruction": "instruction", "output": data.output_field,
            "text": data.text_field}


def _conversation_column(dataset) -> str:
    return next(c for c in CONVERSATION_COLUMNS if c in dataset.column_names)


def _standardize(dataset):
    from .data_formats import standardize_data_formats

    return standardize_data_formats(dataset)


def _to_conversations(dataset, fmt: str, data: DataSection):
    """messages / sharegpt / instruction data -> role/content conversations in a `messages` column."""
    if fmt == "instruction":
        from .data_formats import to_sharegpt

        dataset = to_sharegpt(dataset, merged_prompt=data.prompt_template, output_column_name=data.output_field)
    dataset = _standardize(dataset)
    column = _conversation_column(dataset)
    if column != "messages":
        dataset = dataset.rename_column(column, "messages")
    return dataset


def _convert_without_tokenizer(dataset, fmt: str, trainer: str, data: DataSection):
    if trainer == "kto" and fmt == "preference":
        from trl.data_utils import unpair_preference_dataset

        return unpair_preference_dataset(dataset)
    if trainer == "grpo" and fmt in ("messages", "sharegpt", "instruction"):
        dataset = _to_conversations(dataset, fmt, data)

        def split_turns(row):
            messages = list(row["messages"])
            answer = None
            if messages and messages[-1]["role"] == "assistant":
                answer = messages.pop()["content"]
            return {"prompt": messages, "answer": answer}

        keep = [c for c in dataset.column_names if c not in ("messages", "prompt", "answer")]
        return dataset.map(split_turns, remove_columns=["messages"] + keep, desc="Splitting prompts and answers")
    if trainer == "sft" and fmt in ("messages", "sharegpt", "instruction"):
        return _to_conversations(dataset, fmt, data)
    if trainer == "sft" and fmt == "text" and data.text_field != "text":
        return dataset.rename_column(data.text_field, "text")
    return dataset


def format_for_trainer(dataset, fmt: str, trainer: str, tokenizer):
    """Renders SFT conversations into a ``text`` column with the tokenizer's chat template (Unsloth's notebook
    recipe) and keeps only the columns the trainer reads. Other trainers' data is returned as it is (TRL applies
    the chat template to conversational preference and prompt data itself)."""
    if dataset is None:
        return None
    if trainer == "sft" and fmt in ("messages", "sharegpt", "instruction"):
        from .data_formats import apply_chat_template

        dataset = apply_chat_template(dataset, tokenizer, conversation_column="messages",
                                      remove_conversation_column=True)
    if trainer == "sft":
        keep = ["prompt", "completion"] if fmt == "prompt_completion" else ["text"]
        extra = [c for c in dataset.column_names if c not in keep]
        if extra:
            dataset = dataset.remove_columns(extra)
    return dataset
