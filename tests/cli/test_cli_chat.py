"""`fastlm chat` driven through standard input (multi-turn, /reset, /exit) and `fastlm generate --json`, on a saved
tiny adapter directory; `fastlm env`; the console script."""
from __future__ import annotations

import json
import re

import pytest

from fastlm.cli.main import main

from _cli_helpers import run_fastlm

STATS = re.compile(r"\[(\d+) prompt tokens, (\d+) new tokens, [\d.]+ tok/s, (stop|length)\]")


def test_chat_through_stdin_keeps_history_resets_and_exits(trained_adapter):
    conversation = "Hello there\nWhat is the capital?\n/reset\nHello there\n/exit\nThis line is never read\n"
    done = run_fastlm("chat", trained_adapter, "--max-seq-length", "256", "--temperature", "0",
                      "--max-new-tokens", "6", "--stats", input=conversation)
    assert done.returncode == 0, done.stderr
    turns = [(int(a), int(b), c) for a, b, c in STATS.findall(done.stderr)]
    assert len(turns) == 3, done.stderr  # three messages answered; nothing after /exit
    (p1, n1, _), (p2, _, _), (p3, n3, _) = turns
    assert p2 > p1 + n1  # the second turn's prompt holds the first question and answer
    assert p3 == p1 and n3 == n1  # after /reset the conversation starts afresh
    assert "(new conversation)" in done.stderr
    replies = [line for line in done.stdout.splitlines()]
    assert len(replies) == 3 and replies[0] == replies[2], done.stdout  # greedy: same context, same reply


def test_chat_rejects_bad_flags_before_loading(capsys):
    assert main(["chat", "/nonexistent/model", "--temperature", "-1", "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 problems found" in err and "--temperature" in err and "--top-p" in err


def test_generate_json_is_deterministic_and_respects_max_new_tokens(trained_adapter, capsys):
    args = ["generate", str(trained_adapter), "--max-seq-length", "256", "--prompt", "Hello there",
            "--prompt", "What is the capital?", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in first] == ["Hello there", "What is the capital?"]
    for record in first:
        assert set(record) == {"model", "prompt", "completion", "prompt_tokens", "new_tokens", "seconds",
                               "tokens_per_second", "finish_reason"}
        assert 0 < record["new_tokens"] <= 5 and record["finish_reason"] in ("stop", "length")
    assert main(args) == 0
    second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in first] == [r["completion"] for r in second]

    # sampling with a seed is reproducible too, and plain output prints just the completion
    sample = ["generate", str(trained_adapter), "--max-seq-length", "256", "--prompt", "Hi", "--temperature", "1.0",
              "--seed", "7", "--max-new-tokens", "5"]
    assert main(sample) == 0
    one = capsys.readouterr().out
    assert main(sample) == 0
    assert capsys.readouterr().out == one


def test_env_reports_the_stack(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] and info["packages"]["transformers"] and info["fastlm"]
    assert info["extras"]["train"]["installed"] is True
    assert "cuda_available" in info["gpu"]
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "transformers" in text and "extras:" in text and "gpu" in text


def test_console_script_points_at_main(capsys):
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    if "fastlm" not in scripts:
        pytest.skip("fastlm is not installed as a distribution (pip install -e .)")
    assert scripts["fastlm"] == "fastlm.cli.main:main"
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    usage = capsys.readouterr().out
    assert all(command in usage for command in ("train", "chat", "generate", "env"))
    assert main([]) == 2  # no command: help on stderr, usage error
