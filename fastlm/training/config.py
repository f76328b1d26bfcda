"""`TrainConfig`: the typed configuration of `fastlm train`, checked as a whole before any model is loaded.

A config is a YAML mapping with the sections ``model``, ``lora``, ``data``, ``trainer``, ``training`` and
``output`` (plus the top-level flag ``resume``). Every section and key has a type, a default and a rule; unknown
keys (with a "did you mean"), wrong types, out-of-range values and contradictions between sections are all
collected and raised once as a `ConfigError`. ``key=value`` overrides use dotted keys (``training.max_steps=10``,
``resume=true``) and YAML scalar syntax for values (``lora.target_modules=[q_proj,v_proj]``).

    config = load_config("examples/quickstart.yaml", ["training.max_steps=5"])
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ProblemList
from ..loading.embedded import EMBEDDED_MODEL_NAME
from .config_schema import (apply_overrides, build_section, did_you_mean, non_negative, parse_overrides, positive,
                            spec)

__all__ = ["TrainConfig", "ModelSection", "LoraSection", "DataSection", "TrainerSection", "TrainingSection",
           "OutputSection", "load_config", "config_from_dict", "apply_overrides", "parse_overrides",
           "resolve_data_path", "BUNDLED_DATASETS", "TRAINER_TYPES", "DATA_FORMATS", "FORMATS_FOR_TRAINER"]

PRECISIONS = ("4bit", "8bit", "16bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAINER_TYPES = ("sft", "dpo", "orpo", "kto", "grpo")
DATA_FORMATS = ("auto", "messages", "sharegpt", "instruction", "text", "prompt_completion", "preference",
                "unpaired_preference", "prompt")
# which data formats each trainer can train on (others are converted where that is lossless, see data_loading.py)
FORMATS_FOR_TRAINER = {
    "sft": ("messages", "sharegpt", "instruction", "text", "prompt_completion"),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("unpaired_preference", "preference"),
    "grpo": ("prompt", "messages", "sharegpt", "instruction"),
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
BUNDLED_PREFIX = "bundled:"
BUNDLED_DATASETS = {"quickstart": "quickstart.jsonl"}
# TrainingArguments that fastlm sets itself; `training.extra` may not set them
MANAGED_ARGS = frozenset({"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "save_strategy",
                          "logging_strategy", "disable_tqdm", "report_to", "max_length", "dataset_text_field",
                          "packing", "beta", "num_generations", "max_completion_length", "eval_strategy",
                          "include_num_input_tokens_seen"})


@dataclass
class ModelSection:
    """Which model to load and how (the arguments of `FastLanguageModel.from_pretrained`)."""

    name: str = spec(EMBEDDED_MODEL_NAME, "a local model or adapter directory, or a Hugging Face model name",
                     fix=f"e.g. name: {EMBEDDED_MODEL_NAME} (the embedded default model)")
    max_seq_length: int = spec(2048, "a positive integer", positive, "e.g. 2048")
    precision: str = spec("4bit", f"one of {PRECISIONS}", choices=PRECISIONS,
                          fix="use 16bit for LoRA, 4bit for QLoRA")
    dtype: str = spec("auto", f"one of {DTYPES}", choices=DTYPES,
                      fix="use auto (bfloat16 or float16 on GPUs, float32 on CPU)")
    full_finetuning: bool = spec(False, "true or false", fix="true trains every weight (needs precision: 16bit)")
    use_gradient_checkpointing: typing.Union[bool, str] = spec(
        "unsloth", "true, false or 'unsloth'", lambda v: v in (True, False, "unsloth"), "use unsloth")
    trust_remote_code: bool = spec(False, "true or false")
    revision: typing.Optional[str] = spec(None, "a git revision of the model repository, or null")
    chat_template: typing.Optional[str] = spec(
        None, "null (keep the tokenizer's template) or a template name for get_chat_template",
        fix="e.g. chatml, llama-3, qwen-2.5, gemma")


@dataclass
class LoraSection:
    """LoRA adapters (the arguments of `FastLanguageModel.get_peft_model`); must be disabled for full fine-tuning."""

    enabled: bool = spec(True, "true or false", fix="false only together with model.full_finetuning: true")
    r: int = spec(16, "a positive integer", positive, "e.g. 16")
    alpha: float = spec(16, "a positive number", positive, "e.g. equal to r, or 2*r")
    dropout: float = spec(0.0, "a number in [0, 1)", lambda v: 0 <= v < 1, "use 0")
    target_modules: typing.Union[typing.List[str], str] = spec(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "a list of linear module names, or 'all-linear'", lambda v: bool(v), "e.g. [q_proj, v_proj]")
    bias: str = spec("none", "one of ('none', 'all', 'lora_only')", choices=("none", "all", "lora_only"))
    use_rslora: bool = spec(False, "true or false")
    random_state: int = spec(3407, "an integer seed")


@dataclass
class DataSection:
    """The training data: a local file, a bundled dataset or a Hugging Face dataset, and its format."""

    path: typing.Optional[str] = spec(
        None, "a local .json/.jsonl/.csv/.parquet/.txt file, a saved dataset directory, 'bundled:<name>' or a "
              "Hugging Face dataset name", fix="e.g. path: bundled:quickstart")
    format: str = spec("auto", f"one of {DATA_FORMATS}", choices=DATA_FORMATS,
                       fix="use auto to detect it from the columns")
    split: str = spec("train", "a split name, optionally sliced (train[:1000])")
    subset: typing.Optional[str] = spec(None, "a dataset configuration name, or null")
    text_field: str = spec("text", "the column holding plain text (format: text)")
    prompt_template: str = spec(
        "{instruction}[[\nYour input is:\n{input}]]",
        "a to_sharegpt merged_prompt: {column} inserts a column, [[...]] is dropped when its columns are empty",
        lambda v: "{" in v, "e.g. '{instruction}[[\\n{input}]]'")
    output_field: str = spec("output", "the column holding answers (format: instruction)")
    max_samples: typing.Optional[int] = spec(None, "null or a positive integer", positive, "e.g. 1000")
    eval_fraction: float = spec(0.0, "a number in [0, 0.5)", lambda v: 0 <= v < 0.5,
                                "e.g. 0.05 holds out 5% of rows for evaluation, 0 for none")
    seed: int = spec(3407, "an integer seed (used for the evaluation split)")


@dataclass
class TrainerSection:
    """Which TRL trainer runs, and its own options."""

    type: str = spec("sft", f"one of {TRAINER_TYPES}", choices=TRAINER_TYPES)
    train_on_responses_only: bool = spec(False, "true or false (sft only): loss on assistant replies only")
    packing: bool = spec(False, "true or false (sft only)")
    fix_untrained_tokens: bool = spec(False, "true or false: give never-trained embedding rows used by the data "
                                              "the mean embedding before training")
    beta: typing.Optional[float] = spec(None, "null (the trainer's default) or a positive number (dpo, orpo, "
                                               "kto, grpo)", non_negative, "e.g. 0.1")
    reward_functions: typing.List[str] = spec(
        [], "names of fastlm reward functions or 'package.module:function' (grpo only)", fix="e.g. [exact_match]")
    reward_weights: typing.Optional[typing.List[float]] = spec(None, "null or one weight per reward function")
    num_generations: int = spec(4, "an integer >= 2 (grpo: completions per prompt)", lambda v: v >= 2, "e.g. 4")
    max_completion_length: int = spec(256, "a positive integer (grpo, orpo)", positive, "e.g. 256")


@dataclass
class TrainingSection:
    """Training arguments (TRL's config / transformers' TrainingArguments)."""

    max_steps: int = spec(-1, "-1 (use num_train_epochs) or a positive integer", lambda v: v == -1 or v > 0)
    num_train_epochs: float = spec(1.0, "a positive number", positive)
    per_device_train_batch_size: int = spec(2, "a positive integer", positive)
    gradient_accumulation_steps: int = spec(4, "a positive integer", positive)
    learning_rate: float = spec(2e-4, "a positive number", positive, "e.g. 2e-4 for LoRA, 2e-5 for full")
    lr_scheduler_type: str = spec("linear", "a transformers scheduler name",
                                  choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                           "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                                           "cosine_with_min_lr", "warmup_stable_decay"))
    warmup_steps: int = spec(0, "a non-negative integer", non_negative)
    weight_decay: float = spec(0.0, "a non-negative number", non_negative)
    optim: str = spec("adamw_torch", "a transformers optimizer name",
                      fix="adamw_torch, adamw_8bit (bitsandbytes), paged_adamw_8bit, sgd, adafactor")
    max_grad_norm: float = spec(1.0, "a non-negative number", non_negative)
    logging_steps: int = spec(1, "a positive integer", positive)
    save_steps: int = spec(50, "a positive integer: a checkpoint every N steps", positive)
    save_total_limit: typing.Optional[int] = spec(
        2, "null (keep all) or an integer >= 2", lambda v: v >= 2,
        "use 2 or more: the last complete checkpoint must stay while the next one is written")
    eval_steps: typing.Optional[int] = spec(None, "null (= save_steps) or a positive integer", positive)
    seed: int = spec(3407, "an integer seed")
    extra: typing.Dict[str, Any] = spec({}, "a mapping of further arguments of the trainer's TRL config")


@dataclass
class OutputSection:
    """Where checkpoints, the adapter, the loss curve and the summary go."""

    dir: str = spec("outputs", "a directory path", lambda v: bool(v.strip()))
    overwrite: bool = spec(False, "true or false: delete checkpoints left by an earlier run in this directory")
    save_model: bool = spec(True, "true or false: save the adapter (or full model) and tokenizer at the end")
    loss_plot: bool = spec(True, "true or false: write loss.png at the end")


SECTIONS = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "trainer": TrainerSection,
            "training": TrainingSection, "output": OutputSection}


@dataclass
class TrainConfig:
    """The whole run. Build it with `load_config` (a YAML file) or `config_from_dict`; both validate."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)
    resume: bool = False
    # the directory of the YAML file (relative data paths are also looked up there); not a config key
    base_dir: typing.Optional[str] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("base_dir")
        return out


def config_from_dict(raw: Mapping | None, overrides: Iterable[str] = (), base_dir: str | None = None,
                     context: str = "fastlm train config") -> TrainConfig:
    """A validated `TrainConfig` from a mapping (as read from YAML) plus ``key=value`` overrides.

    Raises `ConfigError` listing every problem: unknown sections or keys, wrong types, values out of range,
    contradictions between sections, a missing local data file, unknown reward functions and unknown
    ``training.extra`` keys for the chosen trainer. Nothing is loaded.
    """
    problems = ProblemList(context)
    if raw is not None and not isinstance(raw, Mapping):
        problems.add("config", type(raw).__name__, "a YAML mapping with the sections " + ", ".join(SECTIONS),
                     "start the file with 'model:' / 'data:' ... sections")
        problems.raise_if_any()
    merged = apply_overrides(raw or {}, overrides, problems)
    sections = {}
    resume = False
    for key, value in merged.items():
        if key == "resume":
            if isinstance(value, bool):
                resume = value
            else:
                problems.add("resume", value, "true or false", "use resume=true to continue from the last "
                             "complete checkpoint in output.dir")
        elif key not in SECTIONS:
            problems.add(str(key), value, "not a section; the sections are " + ", ".join(SECTIONS) + " (and resume)",
                         did_you_mean(str(key), list(SECTIONS) + ["resume"]) + "remove it or fix its spelling")
    for name, cls in SECTIONS.items():
        sections[name] = build_section(name, cls, merged.get(name), problems)
    config = TrainConfig(**sections, resume=resume, base_dir=base_dir)
    _check_across_sections(config, problems)
    problems.raise_if_any()
    return config


def load_config(path: str | os.PathLike | Mapping, overrides: Iterable[str] = ()) -> TrainConfig:
    """Reads a YAML config, applies ``key=value`` overrides and validates it all (see `config_from_dict`)."""
    if isinstance(path, Mapping):
        return config_from_dict(path, overrides)
    import yaml

    path = Path(path)
    context = f"fastlm train config {path}"
    if not path.is_file():
        problems = ProblemList(context)
        problems.add("config", str(path), "an existing YAML file", "check the path; examples are in examples/")
        problems.raise_if_any()
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problems = ProblemList(context)
        problems.add("config", str(path), f"valid YAML ({' '.join(str(exc).split())})", "fix the YAML syntax")
        problems.raise_if_any()
    return config_from_dict(raw, overrides, base_dir=str(path.resolve().parent), context=context)


# ---------------------------------------------------------------------------------------------------------------
# checks across sections

def _bundled_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.lower().endswith(LOCAL_SUFFIXES) or path.count("/") > 1


def resolve_data_path(path: str, base_dir: str | None = None) -> Path | None:
    """A local file or directory for `path` (bundled:<name>, relative to the working directory, then to the
    config's directory), or None when `path` is not local (a Hugging Face dataset name)."""
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX):]
        return _bundled_dir() / BUNDLED_DATASETS[name] if name in BUNDLED_DATASETS else None
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate.resolve()
    if base_dir and not candidate.is_absolute() and (Path(base_dir) / candidate).exists():
        return (Path(base_dir) / candidate).resolve()
    return None


def _check_data(config: TrainConfig, p: ProblemList) -> None:
    data = config.data
    if data.path is None:
        p.add("data.path", None, "the training data is required", "e.g. data.path=bundled:quickstart or "
              "data.path=my_data.jsonl")
        return
    if data.path.startswith(BUNDLED_PREFIX):
        if resolve_data_path(data.path) is None:
            p.add("data.path", data.path, "bundled datasets: " + ", ".join(BUNDLED_PREFIX + n for n in
                                                                          BUNDLED_DATASETS), "use one of them")
        return
    local = resolve_data_path(data.path, config.base_dir)
    if local is None and _looks_local(data.path):
        where = "the working directory" + (f" or {config.base_dir}" if config.base_dir else "")
        p.add("data.path", data.path, f"an existing file (looked in {where})", "check the path")
    elif local is not None and local.is_file() and not local.name.lower().endswith(LOCAL_SUFFIXES):
        p.add("data.path", data.path, f"a file ending in one of {LOCAL_SUFFIXES}", "convert the file to JSONL, "
              "CSV or parquet")


def _trl_config_fields(trainer_type: str) -> set[str] | None:
    """Field names of the TRL config class of this trainer (None when TRL is missing)."""
    try:
        from .trl_args import trl_config_class
        cls = trl_config_class(trainer_type)
    except ImportError:
        return None
    return {f.name for f in dataclasses.fields(cls)}


def _check_across_sections(config: TrainConfig, p: ProblemList) -> None:
    m, lora, data, tr, t, out = (config.model, config.lora, config.data, config.trainer, config.training,
                                 config.output)
    if m.full_finetuning and m.precision != "16bit":
        p.add("model.full_finetuning", True, f"full fine-tuning trains 16-bit weights; precision is {m.precision}",
              "set model.precision: 16bit, or model.full_finetuning: false for (Q)LoRA")
    if m.full_finetuning and lora.enabled:
        p.add("lora.enabled", True, "full fine-tuning trains every weight, so the lora section would be unused",
              "set lora.enabled: false with model.full_finetuning: true")
    if not m.full_finetuning and not lora.enabled:
        p.add("lora.enabled", False, "with LoRA off and model.full_finetuning off, nothing would be trained",
              "set lora.enabled: true, or model.full_finetuning: true")
    _check_data(config, p)
    allowed_formats = FORMATS_FOR_TRAINER[tr.type]
    if data.format != "auto" and data.format not in allowed_formats:
        p.add("data.format", data.format, f"the {tr.type} trainer trains on {allowed_formats}",
              f"use a {allowed_formats[0]} dataset, or a trainer that takes {data.format} data")
    if tr.type != "sft":
        for key in ("train_on_responses_only", "packing"):
            if getattr(tr, key):
                p.add(f"trainer.{key}", True, "an option of the sft trainer only", f"remove it for {tr.type}")
    if tr.type == "grpo":
        from .rewards import check_reward_function

        if not tr.reward_functions:
            from .rewards import REWARD_FUNCTIONS

            p.add("trainer.reward_functions", [], "grpo needs at least one reward function; built in: "
                  + ", ".join(REWARD_FUNCTIONS), "e.g. trainer.reward_functions=[exact_match]")
        for name in tr.reward_functions:
            why = check_reward_function(name)
            if why:
                p.add("trainer.reward_functions", name, why, "use a built-in name or 'package.module:function'")
        if tr.reward_weights is not None and len(tr.reward_weights) != len(tr.reward_functions):
            p.add("trainer.reward_weights", tr.reward_weights, f"one weight per reward function "
                  f"({len(tr.reward_functions)})", "give as many weights as reward_functions, or null")
        batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
        if batch % tr.num_generations:
            p.add("trainer.num_generations", tr.num_generations, "must divide per_device_train_batch_size * "
                  f"gradient_accumulation_steps (= {batch})", "e.g. make the batch a multiple of num_generations")
    elif tr.reward_functions:
        p.add("trainer.reward_functions", tr.reward_functions, "used by the grpo trainer only",
              "remove them, or set trainer.type: grpo")
    if tr.beta is not None and tr.type == "sft":
        p.add("trainer.beta", tr.beta, "used by dpo, orpo, kto and grpo", "remove it for sft")
    if config.resume and out.overwrite:
        p.add("output.overwrite", True, "cannot be combined with resume=true (it deletes the checkpoints to "
              "resume from)", "drop one of them")
    if t.extra:
        fields = _trl_config_fields(tr.type)
        typed = {f.name for f in dataclasses.fields(TrainingSection)} - {"extra"}
        for key, value in t.extra.items():
            if key in typed:
                p.add(f"training.extra.{key}", value, f"training.{key} is a typed key", f"set training.{key}")
            elif key in MANAGED_ARGS:
                p.add(f"training.extra.{key}", value, "set by fastlm from the config", "use the matching "
                      "model/trainer/output key (e.g. output.dir, trainer.packing, model.max_seq_length)")
            elif fields is not None and key not in fields:
                p.add(f"training.extra.{key}", value, f"not an argument of the {tr.type} trainer's TRL config",
                      did_you_mean(key, fields) + "remove it or fix its spelling")
