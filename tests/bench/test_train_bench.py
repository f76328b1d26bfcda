"""`fastlm bench train`: end to end on CPU (both sides in their own processes, the JSON line parsed, losses agree),
and the parent's handling of what the worker processes report (OOM, failures, disagreeing losses, max context)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm.bench import train
from fastlm.cli import bench as cli_bench

ROOT = Path(__file__).resolve().parents[2]


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_cpu_run_end_to_end_padding_free_both_sides_agree():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "fastlm.bench.train", "--shape", "tiny-llama", "--batch", "2",
                           "--seq-len", "64", "--steps", "1", "--warmup", "1", "--padding-free"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_json(proc.stdout)
    assert result["hf"]["status"] == result["fastlm"]["status"] == "ok"
    assert result["hf"]["layout"] == "padded" and result["fastlm"]["layout"] == "packed"
    assert len(result["hf"]["losses"]) == len(result["fastlm"]["losses"]) == 2
    assert result["losses_agree"] is True and result["loss_rel_diff"] < 1e-4
    # a random 512-token model starts near ln(512) = 6.24
    assert 5.5 < result["fastlm"]["loss_final"] < 7.0
    assert result["hf"]["tokens_per_s"] > 0 and result["fastlm"]["peak_gb"] > 0
    for side in ("hf", "fastlm"):  # the peak after loading alone, which the whole run's peak includes
        assert 0 < result[side]["load_peak_gb"] <= result[side]["peak_gb"]
    assert result["speed_ratio"] > 0 and result["memory_ratio"] > 0
    assert "losses agree" in proc.stdout and proc.stdout.index("hf ") < proc.stdout.index("{")


def _args(**kw):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args([a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))])


def _fake_workers(monkeypatch, tmp_path, records: dict, calls: list | None = None):
    monkeypatch.setattr(train, "prepare_model", lambda args: (tmp_path, False, {"parameters": 1}))

    def run_worker(kind, args, model_dir, **overrides):
        if calls is not None:
            calls.append((kind, overrides))
        rec = records[kind]
        return rec(overrides) if callable(rec) else dict(rec)

    monkeypatch.setattr(train, "run_worker", run_worker)


def _ok(side, losses, tps=1000.0, peak=10.0):
    return {"side": side, "status": "ok", "losses": losses, "tokens_per_s": tps, "peak_gb": peak,
            "device_name": "cpu", "dtype": "float32", "autocast": False, "versions": {"torch": "x"}}


def test_disagreeing_losses_are_flagged_with_exit_status_3(monkeypatch, tmp_path, capsys):
    _fake_workers(monkeypatch, tmp_path, {"hf": _ok("hf", [6.0, 5.0, 4.0]),
                                          "fastlm": _ok("fastlm", [6.0, 5.5, 4.6], tps=2000.0, peak=5.0)})
    code = train.main(["--shape", "tiny-llama", "--steps", "3", "--warmup", "0", "--loss-last-k", "2"])
    out = capsys.readouterr().out
    result = _last_json(out)
    assert code == train.EXIT_LOSS_MISMATCH
    assert result["losses_agree"] is False and "DISAGREE" in out
    assert abs(result["loss_rel_diff"] - (5.05 - 4.5) / 4.5) < 1e-9
    assert result["speed_ratio"] == 2.0 and result["memory_ratio"] == 0.5


def test_an_oom_side_is_reported_not_crashed(monkeypatch, tmp_path, capsys):
    oom = {"side": "hf", "status": "OOM", "error": "OutOfMemoryError: CUDA out of memory", "losses": [], "peak_gb": 79.1}
    _fake_workers(monkeypatch, tmp_path, {"hf": oom, "fastlm": _ok("fastlm", [6.0, 5.9])})
    code = train.main(["--shape", "tiny-llama"])
    out = capsys.readouterr().out
    result = _last_json(out)
    assert code == 0
    assert result["hf"]["status"] == "OOM" and result["losses_agree"] is None and "memory_ratio" not in result
    assert "OOM" in out.splitlines()[2] and "not compared" in out


def test_a_worker_process_that_dies_becomes_an_error_record(tmp_path, capsys):
    # a model directory whose weights are unreadable: the hf process fails, the parent still prints its JSON line
    (tmp_path / "fastlm_bench_build.json").write_text(json.dumps({"shape": "tiny-llama", "seed": 3407}))
    (tmp_path / "config.json").write_text("{not json")
    code = train.main(["--shape", "tiny-llama", "--sides", "hf", "--model-dir", str(tmp_path), "--steps", "1"])
    captured = capsys.readouterr()
    result = _last_json(captured.out)
    assert code == train.EXIT_SIDE_FAILED
    assert result["hf"]["status"] == "error" and "config" in result["hf"]["error"].lower()


def test_bisection_finds_the_longest_length_that_trains():
    limit_ok = 5000
    length, probes = train.bisect_max_context(lambda n: n <= limit_ok, start=1024, limit=131072, step=256)
    assert length == 4864  # the largest multiple of 256 not above 5000
    assert len(probes) < 12 and all(ok == (n <= limit_ok) for n, ok in probes)
    assert train.bisect_max_context(lambda n: True, 1024, 3000, 256)[0] == 3000
    assert train.bisect_max_context(lambda n: False, 1024, 3000, 256)[0] == 0


def test_max_context_runs_a_fresh_batch_1_probe_per_length(monkeypatch, tmp_path, capsys):
    calls = []

    def fastlm(overrides):
        ok = overrides["seq_len"] <= 3000
        return _ok("fastlm", [6.0]) if ok else {"status": "OOM", "error": "CUDA out of memory"}

    _fake_workers(monkeypatch, tmp_path, {"fastlm": fastlm}, calls)
    code = train.main(["--shape", "tiny-llama", "--max-context", "--context-start", "1024", "--context-step", "512"])
    result = _last_json(capsys.readouterr().out)
    assert code == 0 and result["fastlm"]["max_context"] == 2560 and not result["fastlm"]["limit_reached"]
    assert all(kind == "fastlm" and o["batch"] == 1 and o["steps"] == 1 and o["warmup"] == 0 for kind, o in calls)


def test_invalid_arguments_are_reported_together():
    from fastlm.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        train.check_args(_args(shape="llama-9b", bits=8, sides="hf,vllm", batch=0))
    text = str(err.value)
    assert "4 problems" in text and "--shape" in text and "--bits" in text and "--sides" in text and "--batch" in text


def test_cli_bench_parses_train_options_and_explains_a_missing_generate_benchmark(monkeypatch):
    from fastlm.errors import UnsupportedFeatureError

    parser = argparse.ArgumentParser(prog="fastlm")
    cli_bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "train", "--shape", "qwen3-0.6b", "--bits", "4", "--padding-free"])
    assert (args.shape, args.bits, args.padding_free, args.run) == ("qwen3-0.6b", 4, True, cli_bench.run_train)
    gen = parser.parse_args(["bench", "generate", "--help", "-n", "3"])
    assert gen.argv == ["--help", "-n", "3"]
    import fastlm.bench

    monkeypatch.setitem(sys.modules, "fastlm.bench.generate", None)  # as if the module were absent
    monkeypatch.delattr(fastlm.bench, "generate", raising=False)  # an earlier import leaves the attribute
    with pytest.raises(UnsupportedFeatureError, match="fastlm bench train"):
        gen.run(gen)


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3.1-8b"])
def test_offload_embedding_flag_names_what_it_needs(shape):
    """--offload-embedding needs untied embeddings and a CUDA device; otherwise the command says so before
    building anything (on this CPU machine both shapes are refused; the tied one for its shape too)."""
    from fastlm.bench import train as bench_train
    from fastlm.errors import ConfigError

    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--shape", shape, "--offload-embedding"])
    if torch.cuda.is_available() and shape == "llama-3.1-8b":
        pytest.skip("accepted on a GPU (the run itself is the device benchmark)")
    with pytest.raises(ConfigError, match="--offload-embedding.*untied embeddings"):
        bench_train.check_args(args)


def test_tiled_mlp_flag_reaches_the_fastlm_load(monkeypatch, tmp_path):
    """--tiled-mlp travels to the worker process and into from_pretrained(unsloth_tiled_mlp=True) (long contexts:
    the Llama-3.1-8B 400k probe needs the MLP in tiles)."""
    from fastlm.api import FastLanguageModel
    from fastlm.bench import train_worker

    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        train_worker.load_fastlm(tmp_path, 16, 8, 0, torch.float32, 64, tiled_mlp=True)
    assert seen["unsloth_tiled_mlp"] is True

    cmds = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: cmds.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    args = train.build_parser().parse_args(["--shape", "tiny-llama", "--tiled-mlp"])
    train.run_worker("fastlm", args, tmp_path)
    assert "--tiled-mlp" in cmds[0]
