"""Helpers of the CLI tests: a config writer, subprocess runs of `fastlm`, loss histories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "fastlm" / "data" / "quickstart.jsonl"


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def fastlm_cmd(*args: str) -> list[str]:
    """`python -m fastlm.cli ...`: the console script's code, runnable without the script on PATH."""
    return [sys.executable, "-m", "fastlm.cli", *map(str, args)]


def run_fastlm(*args: str, input: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(fastlm_cmd(*args), input=input, capture_output=True, text=True, env=cli_env(),
                          timeout=timeout, cwd=str(REPO))


def write_config(path: Path, model_dir: Path, output_dir: Path, data: Path = QUICKSTART, **sections) -> Path:
    """A small SFT config for a tiny model; `sections` update the sections (e.g. training={"max_steps": 8})."""
    config = {
        "model": {"name": str(model_dir), "precision": "16bit", "max_seq_length": 256},
        "lora": {"r": 8, "alpha": 16},
        "data": {"path": str(data)},
        "trainer": {"type": "sft"},
        "training": {"max_steps": 8, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 4, "seed": 0},
        "output": {"dir": str(output_dir)},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def losses(trainer_state: Path) -> dict[int, float]:
    """step -> logged training loss; asserts no step was logged twice."""
    history = json.loads(trainer_state.read_text())["log_history"]
    steps = [e["step"] for e in history if "loss" in e]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {e["step"]: e["loss"] for e in history if "loss" in e}
