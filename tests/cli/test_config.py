"""TrainConfig: typed sections, key=value overrides, every problem reported at once; data format detection;
reward functions. Nothing here loads a model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fastlm.errors import ConfigError
from fastlm.training.config import TrainConfig, config_from_dict, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _problems(exc: ConfigError) -> dict[str, object]:
    return {p.name: p.value for p in exc.problems}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_are_valid_and_name_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# fastlm train examples/{path.name}", first
    config = load_config(path)
    assert isinstance(config, TrainConfig)


def test_examples_include_the_embedded_quickstart():
    config = load_config(REPO / "examples" / "quickstart.yaml")
    assert config.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config.data.path == "bundled:quickstart"
    assert config.model.precision == "16bit"
    assert {c.trainer.type for c in map(load_config, EXAMPLES)} >= {"sft", "dpo"}


def test_defaults_and_overrides_with_dotted_keys(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    config = config_from_dict({"data": {"path": str(data)}}, [
        "training.max_steps=10", "lora.target_modules=[q_proj,v_proj]", "resume=true",
        "training.learning_rate=1e-3", "model.chat_template=chatml", "training.extra.dataloader_num_workers=0",
        "output.dir=out/x"])
    assert config.training.max_steps == 10
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.resume is True
    assert config.training.learning_rate == pytest.approx(1e-3)  # YAML reads 1e-3 as a string; coerced
    assert config.training.extra == {"dataloader_num_workers": 0}
    assert config.output.dir == "out/x"
    assert config.lora.r == 16 and config.trainer.type == "sft"  # untouched defaults


def test_every_problem_is_reported_at_once(tmp_path):
    raw = {
        "modle": {"name": "x"},
        "model": {"nmae": "x", "precision": "3bit", "max_seq_length": -5},
        "lora": {"r": "sixteen"},
        "training": {"learning_rate": "fast", "save_total_limit": 1, "extra": {"lerning_rate": 1}},
        "data": {"path": str(tmp_path / "missing.jsonl")},
        "output": {"dir": "o"},
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, ["training.max_steps=abc", "not-an-override"])
    problems = _problems(info.value)
    for name in ("modle", "model.nmae", "model.precision", "model.max_seq_length", "lora.r",
                 "training.learning_rate", "training.save_total_limit", "training.extra.lerning_rate", "data.path",
                 "training.max_steps", "override"):
        assert name in problems, (name, str(info.value))
    text = str(info.value)
    assert f"{len(info.value.problems)} problems found" in text
    assert "did you mean 'model'" in text and "did you mean 'name'" in text
    assert "Fix:" in text


def test_contradictions_between_sections(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"full_finetuning": True, "precision": "4bit"}, "lora": {"enabled": True},
                          "data": {"path": str(data), "format": "preference"},
                          "trainer": {"type": "sft", "reward_functions": ["exact_match"], "beta": 0.1}},
                         ["resume=true", "output.overwrite=true"])
    problems = _problems(info.value)
    assert {"model.full_finetuning", "lora.enabled", "data.format", "trainer.reward_functions", "trainer.beta",
            "output.overwrite"} <= set(problems)

    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"path": str(data)}, "lora": {"enabled": False},
                          "trainer": {"type": "grpo", "num_generations": 3, "packing": True,
                                      "reward_functions": ["no_such_reward", "os.path:no_such_function"]}})
    problems = [p.name for p in info.value.problems]
    assert "lora.enabled" in problems and "trainer.num_generations" in problems and "trainer.packing" in problems
    assert problems.count("trainer.reward_functions") == 2


def test_yaml_file_errors_and_relative_data_paths(tmp_path):
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "hi"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"path": "data/train.jsonl"}}))
    config = load_config(cfg)  # relative to the config's directory when not found in the working directory
    assert config.base_dir == str(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="an existing YAML file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="bundled datasets"):
        config_from_dict({"data": {"path": "bundled:nope"}})


def test_override_syntax():
    from fastlm.errors import ProblemList

    p = ProblemList("t")
    assert parse_overrides(["a.b.c=1", "a.b.d=[x, y]", "e=", "f=null", "g='1e-3'"], p) == \
        {"a": {"b": {"c": 1, "d": ["x", "y"]}}, "e": None, "f": None, "g": "1e-3"}
    assert not p.problems
    parse_overrides(["=1", "a..b=2", "novalue"], p)
    assert len(p.problems) == 3


# ---- data loading: format detection and conversion per trainer (datasets only, no model) -----------------------

FORMAT_ROWS = {
    "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "instruction": {"instruction": "q", "input": "", "output": "a"},
    "text": {"text": "plain text"},
    "prompt_completion": {"prompt": "q", "completion": "a"},
    "preference": {"prompt": "q", "chosen": "good", "rejected": "bad"},
    "unpaired_preference": {"prompt": "q", "completion": "a", "label": True},
    "prompt": {"prompt": "q", "answer": "a"},
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_format_detection(tmp_path, fmt):
    from fastlm.training.config import FORMATS_FOR_TRAINER
    from fastlm.training.data_loading import load_training_data

    path = _write_jsonl(tmp_path / "d.jsonl", [FORMAT_ROWS[fmt]] * 4)
    trainer = next(t for t, formats in FORMATS_FOR_TRAINER.items() if fmt in formats)
    extra = {"reward_functions": ["exact_match"], "num_generations": 2} if trainer == "grpo" else {}
    config = config_from_dict({"data": {"path": str(path)}, "trainer": {"type": trainer, **extra}})
    data = load_training_data(config)
    assert data.format == fmt
    columns = set(data.train.column_names)
    expected = {"sft": {"messages"} if fmt in ("messages", "sharegpt", "instruction") else
                {"text"} if fmt == "text" else {"prompt", "completion"},
                "dpo": {"chosen", "rejected"}, "kto": {"prompt", "completion", "label"},
                "grpo": {"prompt"}}[trainer]
    assert expected <= columns, columns


def test_conversions_for_kto_and_grpo(tmp_path):
    from fastlm.training.data_loading import load_training_data

    pref = _write_jsonl(tmp_path / "p.jsonl", [FORMAT_ROWS["preference"]] * 3)
    data = load_training_data(config_from_dict({"data": {"path": str(pref)}, "trainer": {"type": "kto"}}))
    assert len(data.train) == 6 and sorted(data.train["label"]) == [False] * 3 + [True] * 3

    chats = _write_jsonl(tmp_path / "c.jsonl", [FORMAT_ROWS["sharegpt"]] * 4)
    data = load_training_data(config_from_dict({"data": {"path": str(chats)}, "trainer": {
        "type": "grpo", "reward_functions": ["exact_match"], "num_generations": 2}}))
    row = data.train[0]
    assert row["prompt"] == [{"role": "user", "content": "q"}] and row["answer"] == "a"


def test_data_problems_name_the_columns(tmp_path):
    from fastlm.training.data_loading import load_training_data

    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "a"}])
    with pytest.raises(ConfigError) as info:
        load_training_data(config_from_dict({"data": {"path": str(path)}}))
    assert "['question', 'reply']" in str(info.value)
    pref = _write_jsonl(tmp_path / "p.jsonl", [FORMAT_ROWS["text"]])
    with pytest.raises(ConfigError, match="dpo trainer trains on"):
        load_training_data(config_from_dict({"data": {"path": str(pref)}, "trainer": {"type": "dpo"}}))


def test_bundled_quickstart_and_splits(tmp_path):
    from fastlm.training.data_loading import load_training_data

    data = load_training_data(config_from_dict({"data": {"path": "bundled:quickstart", "eval_fraction": 0.25,
                                                         "max_samples": 8}}))
    assert data.format == "messages" and len(data.train) == 6 and len(data.eval) == 2


def test_reward_functions():
    from fastlm.training.rewards import get_reward_function

    completions = ["The answer is Quillhaven.", "quillhaven", "<think>hmm</think> Quillhaven"]
    kwargs = {"answer": ["Quillhaven"] * 3}
    assert get_reward_function("exact_match")(completions, **kwargs) == [0.0, 1.0, 1.0]
    assert get_reward_function("contains_answer")(completions, **kwargs) == [1.0, 1.0, 1.0]
    assert get_reward_function("think_format")(completions) == [0.0, 0.0, 1.0]
    conversational = [[{"role": "assistant", "content": "Quillhaven"}]]
    assert get_reward_function("exact_match")(conversational, answer=["quillhaven"]) == [1.0]
    assert get_reward_function("no_repetition")(["a b c a b c a b c"])[0] < 0
    assert get_reward_function("os.path:basename") is __import__("os").path.basename
