"""What `fastlm train` checks before it loads a model, also run alone by `fastlm train --dry-run`: the output
directory, the model's files, the chat template name, the trainer's arguments (the TRL config is built once, so
its own errors appear here) and every row of the data. All problems are raised together as one `ConfigError`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ConfigError, FastLMError, ProblemList
from .checkpoints import find_last_complete_checkpoint, list_checkpoints
from .config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["check_before_loading"]


def _model_dirs(name: str) -> list[Path]:
    """Local directories the model of `name` would be read from (the directory, an adapter's base, the embedded
    copy, a Hugging Face cache snapshot), found without loading anything."""
    from ..loading import embedded
    from ..loading.source import _from_cache

    dirs: list[Path] = []
    local = Path(name).expanduser()
    if local.is_dir():
        dirs.append(local.resolve())
        adapter_cfg = local / "adapter_config.json"
        if adapter_cfg.is_file() and not (local / "config.json").is_file():
            try:
                base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
            except (OSError, ValueError):
                base = None
            if base:
                dirs += _model_dirs(str(base))
        return dirs
    if "/" in name and not name.startswith((".", "/", "~")):
        cached = _from_cache(name, None, None)
        if cached is not None:
            dirs.append(cached.resolve())
    if embedded.is_embedded_name(name):
        dirs.append(embedded.embedded_model_dir().resolve())
    return dirs


def _as_problem(p: ProblemList, name: str, value, exc: Exception) -> None:
    """An UnsafeWriteError ("<what>. Fix: <fix>") as a problem of the config key `name`."""
    text, _, fix = str(exc).partition(" Fix: ")
    text = text.removeprefix(f"{name}: ").rstrip(".")
    p.add(name, value, text, fix.rstrip(".") or "choose another output.dir")


def _check_output_dir(config: TrainConfig, output_dir: Path, p: ProblemList) -> Path | None:
    """The checkpoint to resume from (None: start at step 0). Adds a problem when the directory cannot be written
    (a file, not writable, the model's own directory) or when an earlier run's checkpoints would be mixed with
    this one."""
    from ..utils.safe_write import UnsafeWriteError, check_free_space, check_target_dir, refuse_source_dir

    try:
        check_target_dir(output_dir, "output.dir")
        refuse_source_dir(output_dir, _model_dirs(config.model.name), "output.dir")
        check_free_space(output_dir, 256 * 2 ** 20 if not config.model.full_finetuning else
                         4 * sum(f.stat().st_size for d in _model_dirs(config.model.name)[:1]
                                 for f in d.glob("*.safetensors")), "output.dir")
    except UnsafeWriteError as exc:
        _as_problem(p, "output.dir", config.output.dir, exc)
        return None
    checkpoints = list_checkpoints(output_dir)
    if config.resume:
        found = find_last_complete_checkpoint(output_dir)
        if found is None:
            logger.warning("fastlm: resume=true but %s holds no complete checkpoint; starting at step 0",
                           output_dir)
        return found
    if checkpoints and not config.output.overwrite:
        names = ", ".join(c.name for c in checkpoints[:3]) + (" ..." if len(checkpoints) > 3 else "")
        p.add("output.dir", str(output_dir), f"a directory without checkpoints of an earlier run (it holds {names})",
              "pass resume=true to continue that run, output.overwrite=true to start over, or another output.dir")
    return None


def _check_model_files(config: TrainConfig, p: ProblemList) -> None:
    """A local model or adapter directory exists, an adapter's base is there, and no weight file is truncated."""
    from ..loading.source import looks_like_local_path
    from ..loading.weights_check import check_safetensors_files

    name = config.model.name
    local = Path(name).expanduser()
    if not local.exists():
        if looks_like_local_path(name):
            p.add("model.name", name, "an existing model or adapter directory (no such directory)",
                  "check the path")
        return
    if not local.is_dir():
        p.add("model.name", name, "a directory (this is a file)", "pass the directory that holds config.json")
        return
    dirs = _model_dirs(name)
    adapter_cfg = local / "adapter_config.json"
    if adapter_cfg.is_file() and not (local / "config.json").is_file() and len(dirs) == 1:
        try:
            base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError) as exc:
            p.add("model.name", name, f"an adapter directory with a readable adapter_config.json ({exc})",
                  "save the adapter again")
            return
        if base and looks_like_local_path(str(base)):
            p.add("model.name", name, f"an adapter whose base model {base!r} (base_model_name_or_path in "
                  f"{adapter_cfg}) exists; that directory is gone", "put the base model back there, or edit "
                  "base_model_name_or_path in adapter_config.json")
    for directory in dirs:
        try:
            check_safetensors_files(directory)
        except FastLMError as exc:
            text, _, fix = str(exc).partition(" Fix: ")
            p.add("model.name", name, text.rstrip("."), fix.rstrip(".") or "load the model files again")


def _check_chat_template(config: TrainConfig, p: ProblemList) -> None:
    if not config.model.chat_template:
        return
    from .chat_templates import build_chat_template

    try:
        build_chat_template(config.model.chat_template)
    except ConfigError as exc:
        for problem in exc.problems:
            p.add("model.chat_template", config.model.chat_template, problem.allowed, problem.fix)


def _check_trainer_args(config: TrainConfig, output_dir: Path, has_eval: bool, p: ProblemList) -> None:
    """Builds the TRL config the run will use, so that its own checks (an unknown optimizer, bf16 on a machine
    without it, ...) fail here and not after the model has loaded."""
    from .trl_args import trl_args as _trl_args

    try:
        _trl_args(config, output_dir, has_eval)
    except ImportError:
        return  # TRL missing: the run itself names the extra to install
    except (ValueError, TypeError, KeyError) as exc:
        p.add("training", config.trainer.type, f"arguments the {config.trainer.type} trainer accepts (TRL says: "
              f"{' '.join(str(exc).split())[:400]})", "fix the training / training.extra values it names")


def check_before_loading(config: TrainConfig):
    """Everything a run checks before it loads a model (also what `fastlm train --dry-run` runs): the output
    directory (writable, not a file, not the model's own directory, free space, checkpoints of an earlier run) and
    the data (every file, line and row). Raises one `ConfigError` listing all problems.
    Returns (output_dir, checkpoint to resume from or None, TrainingData)."""
    from ..utils.noise import silence_known_noise

    silence_known_noise()
    output_dir = Path(config.output.dir).expanduser().resolve()
    p = ProblemList("fastlm train")
    resume_from = _check_output_dir(config, output_dir, p)
    data = None
    _check_model_files(config, p)
    _check_chat_template(config, p)
    try:
        from .data_loading import load_training_data

        data = load_training_data(config)
    except ConfigError as exc:
        p.problems.extend(exc.problems)
    _check_trainer_args(config, output_dir, data is not None and data.eval is not None, p)
    p.raise_if_any()
    return output_dir, resume_from, data


