"""Programmatic dependent launch (kernels/_triton.py `pdl_mode`): the switch and its environment variable are read
at every launch, CPU launches and the interpreter get no PDL keywords, and the decode kernels compiled for sm_90 wait
(griddepcontrol.wait) before anything but their never-written weights: their SASS is read back (Triton's ptxas and
nvdisasm run on CPU). The kernels' results with USE_PDL off are the existing tests of each kernel module."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastlm.errors import ConfigError  # noqa: E402
from fastlm.kernels import _triton  # noqa: E402

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def hopper(monkeypatch):
    """A (pretend) compute capability 9.0 GPU 0, compiled kernels (no interpreter), PDL settings at their defaults."""
    monkeypatch.setattr(_triton, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTLM_PDL", raising=False)
    monkeypatch.setattr(_triton, "PDL", True)
    monkeypatch.setattr(_triton, "PDL_TRIGGER", True)


def test_cpu_launches_get_no_pdl():
    assert _triton.pdl_mode(torch.device("cpu")) == 0
    assert _triton.pdl_launch(0) == {}
    assert _triton.pdl_launch(1) == {"launch_pdl": True}


def test_pdl_is_on_for_hopper_and_every_switch_turns_it_off(hopper, monkeypatch):
    assert _triton.pdl_mode(CUDA0) == 1
    monkeypatch.setattr(_triton, "PDL_TRIGGER", False)
    assert _triton.pdl_mode(CUDA0) == 2  # PDL without the early trigger
    monkeypatch.setattr(_triton, "PDL_TRIGGER", True)
    for off in ("0", "off", "False"):
        monkeypatch.setenv("FASTLM_PDL", off)
        assert _triton.pdl_mode(CUDA0) == 0, off
    monkeypatch.setenv("FASTLM_PDL", "1")
    assert _triton.pdl_mode(CUDA0) == 1
    monkeypatch.setattr(_triton, "PDL", False)
    assert _triton.pdl_mode(CUDA0) == 0
    monkeypatch.setattr(_triton, "PDL", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no griddepcontrol
    assert _triton.pdl_mode(CUDA0) == 0


def test_gpus_before_hopper_launch_without_pdl(hopper, monkeypatch):
    monkeypatch.setattr(_triton, "_capability", lambda index: (8, 9))
    assert _triton.pdl_mode(CUDA0) == 0


def test_a_triton_without_pdl_launches_without_it(hopper, monkeypatch):
    import triton

    assert _triton.triton_has_pdl()  # the test environment's Triton (>= 3.4) has it
    _triton.triton_has_pdl.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    try:
        assert not _triton.triton_has_pdl() and _triton.pdl_mode(CUDA0) == 0
    finally:
        _triton.triton_has_pdl.cache_clear()


def test_a_bad_environment_value_names_the_fix(hopper, monkeypatch):
    monkeypatch.setenv("FASTLM_PDL", "maybe")
    with pytest.raises(ConfigError, match="FASTLM_PDL='maybe'.*FASTLM_PDL=0"):
        _triton.pdl_mode(CUDA0)


def test_launchers_pass_the_mode_of_the_launch(hopper, monkeypatch):
    """The GEMV launcher reads the switch at launch time: USE_PDL and launch_pdl follow it."""
    from fastlm.kernels import decode_gemv

    seen = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((kwargs["USE_PDL"], kwargs.get("launch_pdl", False)))

    monkeypatch.setattr(decode_gemv, "_gemv_partials_kernel", Spy())
    class Weight:  # what the launcher asks of a [32, 64] weight on GPU 0
        shape, device = (32, 64), CUDA0

        def stride(self, dim):
            return (64, 1)[dim]

    x, w, out = torch.zeros(1, 64), Weight(), torch.zeros(2, 1, 32)
    decode_gemv._launch(x, w, out, (16, 32, 1, 1))
    monkeypatch.setenv("FASTLM_PDL", "0")
    decode_gemv._launch(x, w, out, (16, 32, 1, 1))
    assert seen == [(1, True), (0, False)]


_SASS = None


def _sass_facts() -> dict:
    """{(kernel, USE_PDL): facts} from tests/kernels/pdl_sass.py, run once in a subprocess without the interpreter."""
    global _SASS
    if _SASS is None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = pathlib.Path(__file__).resolve().parents[2]
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        run = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("pdl_sass.py"))], env=env,
                             capture_output=True, text=True, timeout=600)
        if run.returncode:
            if "ptxas" in run.stderr or "nvdisasm" in run.stderr:
                pytest.skip(f"no ptxas/nvdisasm for sm_90 here: {run.stderr.strip().splitlines()[-1]}")
            raise AssertionError(run.stderr[-3000:])
        rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        _SASS = {(r["kernel"], r["use_pdl"]): r for r in rows}
    return _SASS


@pytest.mark.parametrize("kernel,tile_bytes", [("gemv", 16 * 1024 * 2), ("gemv_steps4", 16 * 1024 * 2),
                                               ("nf4_prmt", 4 * 128 * 4), ("nf4_prmt_rows", 4 * 128 * 4),
                                               ("nf4_word", 4 * 64 * 4)])
def test_gemvs_load_exactly_their_weight_tile_before_the_wait(kernel, tile_bytes):
    """Before griddepcontrol.wait a GEMV program loads its first weight tile (all of it for the split-K GEMV, the
    first step's packed words for the NF4 kernels) and nothing else: no activation, no table, no store."""
    facts = _sass_facts()[(kernel, 1)]
    assert facts["wait"] and facts["trigger"]
    assert facts["load_bytes"] * facts["threads"] == tile_bytes
    assert facts["stores"] == 0


@pytest.mark.parametrize("kernel", ["attention_split", "attention_combine"])
def test_attention_kernels_wait_before_any_memory_access(kernel):
    facts = _sass_facts()[(kernel, 1)]
    assert facts["wait"] and facts["trigger"] and facts["load_bytes"] == 0 and facts["stores"] == 0


@pytest.mark.parametrize("kernel,weight_bytes", [("epilogue_qkv", 2 * 16 * 32 * 2), ("epilogue_act", 2 * 16 * 32 * 2),
                                                  ("epilogue_norm", 128 * 2 + 16 * 128 * 2)])
def test_epilogues_load_only_their_weights_before_the_wait(kernel, weight_bytes):
    """The decode epilogues read the adapters' B^T tiles (and the norm its weight) before the wait, nothing else,
    and store nothing before it."""
    facts = _sass_facts()[(kernel, 1)]
    assert facts["wait"] and facts["trigger"] and facts["stores"] == 0
    assert 0 < facts["load_bytes"] * facts["threads"] <= weight_bytes


def test_pdl_modes_compile_to_what_they_say():
    """USE_PDL 0: no griddepcontrol at all (the kernel as before); 2: the wait without the trigger."""
    sass = _sass_facts()
    assert not sass[("gemv", 0)]["wait"] and not sass[("gemv", 0)]["trigger"]
    assert sass[("gemv", 2)]["wait"] and not sass[("gemv", 2)]["trigger"]
