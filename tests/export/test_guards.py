"""Guard rails: source-directory targets, disk-space pre-flight, a failure mid-write, missing extras."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest

from fastlm.utils.safe_write import UnsafeWriteError


def test_refuses_source_directory(tiny_model_factory, lora_model_factory):
    src = tiny_model_factory("llama")
    model, tok = lora_model_factory(src)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(UnsafeWriteError, match="directory the model was loaded from"):
        model.save_pretrained_merged(src, tok)
    with pytest.raises(UnsafeWriteError, match="directory the model was loaded from"):
        model.save_pretrained_merged(src / "sub", tok)
    assert sorted(p.name for p in src.iterdir()) == before


def test_disk_space_preflight(tiny_model_factory, lora_model_factory, tmp_path, monkeypatch):
    import fastlm.utils.safe_write as sw

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sw.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UnsafeWriteError, match="GB free"):
        model.save_pretrained_merged(tmp_path / "out", tok)
    assert not (tmp_path / "out").exists()


def test_failure_mid_write_leaves_old_target_intact(tiny_model_factory, lora_model_factory, tmp_path, monkeypatch):
    import fastlm.export.merged as merged

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("previous export")

    def broken(*args, **kwargs):
        raise OSError("disk fell off")

    monkeypatch.setattr(merged, "write_model_files", broken)
    with pytest.raises(OSError, match="disk fell off"):
        model.save_pretrained_merged(target, tok)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_kill_during_write_leaves_no_target(tiny_model_factory, tmp_path):
    """SIGKILL while shards are being written: the target never appears half-written."""
    src = tiny_model_factory("llama")
    target = tmp_path / "out"
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, fastlm.export.model_files as mf
        from fastlm import FastLanguageModel
        from fastlm.export.methods import attach_export_methods
        real = mf.write_safetensors_shards
        def slow(items, directory, *a, **k):
            n = real(items, directory, *a, **k)
            open({str(marker)!r}, "w").close()
            time.sleep(60)
            return n
        mf.write_safetensors_shards = slow
        import fastlm.export.merged as merged
        merged.write_safetensors_shards = slow
        model, tok = FastLanguageModel.from_pretrained({str(src)!r}, load_in_4bit=False)
        attach_export_methods(model)
        model.save_pretrained_merged({str(target)!r}, tok)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), "the export never reached the write"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftovers) == 1  # the partial write lies only in a hidden temporary directory


def test_bad_arguments_all_reported(tiny_model_factory, lora_model_factory, tmp_path):
    from fastlm.errors import ConfigError

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    with pytest.raises(ConfigError) as err:
        model.save_pretrained_merged(tmp_path / "o", tok, save_method="merged_8bit", maximum_memory_usage=3,
                                     safe_serialization=True)
    text = str(err.value)
    assert "merged_8bit" in text and "maximum_memory_usage" in text and "safe_serialization" in text
