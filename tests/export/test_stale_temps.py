"""A write killed mid-way leaves a hidden temp dir beside the target; the next write to that target removes it
(its process is gone) but keeps the temp dirs of live processes and of other hosts until they are a day old, and
puts back an old target that a kill between the two renames left swapped out."""
import os
import signal
import time

from fastlm.utils import safe_write
from fastlm.utils.safe_write import atomic_directory, remove_stale_temps


def _killed_write(target) -> str:
    """Fork a child that starts an atomic write to `target`, writes a file and is SIGKILLed; returns the temp name."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no cleanup
        os.close(read)
        with atomic_directory(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            os.write(write, tmp.name.encode())
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(write)
    name = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    return name


def test_next_write_removes_the_killed_writes_temp_dir(tmp_path):
    target = tmp_path / "out"
    name = _killed_write(target)
    assert (tmp_path / name / "model.safetensors").is_file() and not target.exists()
    assert f"-{os.getpid()}-" not in name  # named for the killed child's pid
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "config.json").is_file()


def test_live_processes_and_other_hosts_keep_their_temp_dirs(tmp_path, monkeypatch):
    import subprocess
    import sys

    target = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{safe_write._HOST}-{sleeper.pid}-abc"
        other_host = tmp_path / ".out.tmp-0badc0de-1-abc"
        old_unnamed = tmp_path / ".out.tmp-x1y2z3"
        other_target = tmp_path / f".outer.tmp-{safe_write._HOST}-999999999-abc"
        for d in (live, other_host, old_unnamed, other_target):
            d.mkdir()
        day_ago = time.time() - safe_write.STALE_AFTER_S - 60
        os.utime(old_unnamed, (day_ago, day_ago))
        removed = remove_stale_temps(target)
        assert removed == [old_unnamed]
        assert live.is_dir() and other_host.is_dir() and other_target.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temps(target) == [live]  # its process is gone now


def test_swapped_out_old_target_is_put_back(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{safe_write._HOST}-999999999"  # no such pid
    old.mkdir()
    (old / "config.json").write_text('{"complete": true}')
    remove_stale_temps(target)
    assert (target / "config.json").read_text() == '{"complete": true}' and not old.exists()
