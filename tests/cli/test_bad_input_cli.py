"""The bad-input table of the CLI: each row is a `fastlm train ... --dry-run` (or a `fastlm generate` flag) that a
new user could type. Every one must end in exit code 2 with a fastlm message naming the bad value and the fix,
before any model is loaded, and never in a traceback from a dependency. `--dry-run` runs the same checks as a real
run (`check_before_loading`), so what passes here also passes there, and what fails here fails a real run before
the model loads."""
from __future__ import annotations

import json
import os

import pytest

from fastlm.cli.main import main

from _cli_helpers import QUICKSTART

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def _files(tmp_path):
    """name -> path of the bad data files and output targets the rows use."""
    files = {}

    def write(name: str, data: bytes):
        path = tmp_path / name
        path.write_bytes(data)
        files[name] = path

    write("missing_messages.jsonl", (GOOD + "\n" + json.dumps({"text": "no messages here"}) + "\n" + GOOD + "\n")
          .encode())
    write("latin1.jsonl", (GOOD + "\n").encode() + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
          .encode("latin-1"))
    write("malformed.jsonl", (GOOD + "\n" + GOOD + "\n" + '{"messages": [oops\n').encode())
    write("not_object.jsonl", (GOOD + "\n[1, 2]\n").encode())
    write("bad_message.jsonl", (GOOD + "\n" + json.dumps({"messages": [{"content": "no role"}]}) + "\n").encode())
    write("array.json", json.dumps([json.loads(GOOD), "a string row"]).encode())
    write("a_file", b"I am a file")
    return files


# (id, overrides, fragments that must all appear in stderr: the value and the fix)
ROWS = [
    ("lr-inf", ["training.learning_rate=.inf"], ["training.learning_rate=inf", "finite", "Fix: e.g. 2e-4"]),
    ("lr-nan", ["training.learning_rate=nan"], ["training.learning_rate=nan", "finite"]),
    ("lr-negative", ["training.learning_rate=-1"], ["training.learning_rate=-1", "positive"]),
    ("alpha-inf", ["lora.alpha=inf"], ["lora.alpha=inf", "finite", "Fix:"]),
    ("grad-norm-inf", ["training.max_grad_norm=.inf"], ["training.max_grad_norm=inf", "finite"]),
    ("extra-nan", ["training.extra={adam_beta1: .nan}"], ["training.extra.adam_beta1=nan", "finite"]),
    ("dropout-one", ["lora.dropout=1"], ["lora.dropout=1", "[0, 1)"]),
    ("row-without-messages", ["data.path={missing_messages.jsonl}"],
     ["missing_messages.jsonl:2 (row 1) messages=None", "the conversation is missing", "Fix: fix or remove"]),
    ("not-utf8", ["data.path={latin1.jsonl}"], ["latin1.jsonl:2", "not UTF-8", "Fix: save the file as UTF-8"]),
    ("malformed-line", ["data.path={malformed.jsonl}"], ["malformed.jsonl:3", "one JSON object per line",
                                                          "Fix: fix line 3"]),
    ("line-not-object", ["data.path={not_object.jsonl}"], ["not_object.jsonl:2", "a JSON object"]),
    ("message-without-role", ["data.path={bad_message.jsonl}"], ["bad_message.jsonl:2 (row 1)",
                                                                  "message 0 has no 'role'"]),
    ("json-array-row", ["data.path={array.json}"], ["array.json row 1", "a JSON object per row"]),
    ("missing-data-file", ["data.path=nowhere/data.jsonl"], ["data.path='nowhere/data.jsonl'", "check the path"]),
    ("output-is-a-file", ["output.dir={a_file}"], ["output.dir=", "is a file, not a directory",
                                                   "Fix: pass a directory path"]),
    ("output-under-a-file", ["output.dir={a_file}/run"], ["is a file, not a directory", "Fix: pass a path under"]),
    ("missing-model-dir", ["model.name=./no/such/model"], ["model.name='./no/such/model'", "no such directory"]),
    ("model-is-a-file", ["model.name={a_file}"], ["this is a file", "Fix: pass the directory"]),
    ("chat-template-typo", ["model.chat_template=chatmll"], ["model.chat_template='chatmll'", "chatml",
                                                             "Fix: pass one of these names"]),
    ("optimizer-typo", ["training.optim=adamw_fast"], ["adamw_fast is not a valid", "adamw_torch"]),
    ("scheduler-typo", ["training.lr_scheduler_type=cosin"], ["training.lr_scheduler_type='cosin'",
                                                              "did you mean 'cosine'"]),
]


@pytest.mark.parametrize("overrides,fragments", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_train_dry_run_names_value_and_fix(overrides, fragments, tmp_path, capsys):
    files = _files(tmp_path)
    for name, path in files.items():
        overrides = [o.replace("{" + name + "}", str(path)) for o in overrides]
    rc = main(["train", "examples/quickstart.yaml", f"output.dir={tmp_path / 'out'}", *overrides, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_output_dir_not_writable(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["train", "examples/quickstart.yaml", f"output.dir={locked / 'run'}", "--dry-run"]) == 2
    finally:
        locked.chmod(0o755)
    assert "is not writable" in capsys.readouterr().err


def test_output_dir_is_the_model_directory(tmp_path, tiny_llama_dir, capsys):
    """Training into the model's own directory would rewrite it (tokenizer files, an adapter beside config.json)."""
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    for target in (tiny_llama_dir, tiny_llama_dir / "run"):
        rc = main(["train", "examples/quickstart.yaml", f"model.name={tiny_llama_dir}", f"output.dir={target}",
                   "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 2 and "is the directory the model was loaded from" in err and "-finetuned" in err, err
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before


def test_output_dir_is_the_base_of_an_adapter(tmp_path, tiny_llama_dir, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama_dir)}))
    rc = main(["train", "examples/quickstart.yaml", f"model.name={adapter}", f"output.dir={tiny_llama_dir}",
               "--dry-run"])
    assert rc == 2 and "the model was loaded from" in capsys.readouterr().err


def test_real_run_checks_the_data_before_loading(tmp_path, capsys, monkeypatch):
    """What --dry-run reports, a real run reports too, before any weight is read."""
    import fastlm.jobs.train as run

    def refuse(config):
        raise AssertionError("the model was loaded although the data is invalid")

    monkeypatch.setattr(run, "load_model_for_config", refuse)
    files = _files(tmp_path)
    rc = main(["train", "examples/quickstart.yaml", f"data.path={files['missing_messages.jsonl']}",
               f"output.dir={tmp_path / 'out'}"])
    assert rc == 2 and "missing_messages.jsonl:2 (row 1)" in capsys.readouterr().err


def test_good_data_passes(tmp_path, capsys):
    assert main(["train", "examples/quickstart.yaml", f"data.path={QUICKSTART}", f"output.dir={tmp_path / 'o'}",
                 "--dry-run"]) == 0
    assert "config OK" in capsys.readouterr().out


@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "nan"], "--temperature=nan"), (["--repetition-penalty", "inf"], "--repetition-penalty=inf"),
    (["--top-p", "0"], "--top-p=0.0"), (["--max-new-tokens", "0"], "--max-new-tokens=0")])
def test_generate_flags(flags, fragment, capsys, monkeypatch):
    import fastlm.cli._common as common

    monkeypatch.setattr(common, "load_for_inference", lambda args: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["generate", "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Fix:" in err, err


def test_broken_model_files_are_found_by_dry_run(tmp_path, tiny_llama_dir, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    for name, fragments in ((broken, [str(weights), "truncated", "Fix: download or copy it again"]),
                            (adapter, ["base_model_name_or_path", str(tmp_path / "gone"), "adapter_config.json"])):
        rc = main(["train", "examples/quickstart.yaml", f"model.name={name}", f"output.dir={tmp_path / 'out'}",
                   "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 2 and all(f in err for f in fragments), err
