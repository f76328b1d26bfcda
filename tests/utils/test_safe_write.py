"""Saves never overwrite the source model, never leave half-written targets, and check space first."""
import os
from pathlib import Path

import pytest

from fastlm.utils.safe_write import (UnsafeWriteError, atomic_directory, check_free_space, check_target_dir,
                                     refuse_source_dir)


def test_refuses_the_source_directory_and_paths_inside_it(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for target in (src, src / "sub", tmp_path / "x" / ".." / "model"):
        with pytest.raises(UnsafeWriteError, match="loaded from") as err:
            refuse_source_dir(target, [src])
        assert "model-finetuned" in str(err.value)
    assert refuse_source_dir(tmp_path / "other", [src]) == (tmp_path / "other").resolve()


def test_refuses_the_loaded_models_directory(tiny_llama_dir):
    from fastlm import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False)
    with pytest.raises(UnsafeWriteError, match="loaded from"):
        refuse_source_dir(tiny_llama_dir, model)


def test_failed_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_successful_write_replaces_the_target(tmp_path):
    target = tmp_path / "a" / "out"
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (target / "new.txt").read_text() == "new"
    with pytest.raises(UnsafeWriteError, match="not empty"):
        with atomic_directory(target, overwrite=False):
            pass


def test_target_checks_name_the_problem(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UnsafeWriteError, match="is a file"):
        check_target_dir(f)
    with pytest.raises(UnsafeWriteError, match="is a file"):
        check_target_dir(f / "below")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UnsafeWriteError, match="not writable"):
            check_target_dir(ro / "x")
    with pytest.raises(UnsafeWriteError, match="GB free"):
        check_free_space(tmp_path / "new", needed_bytes=1 << 60)
    check_free_space(tmp_path / "new", needed_bytes=1)
