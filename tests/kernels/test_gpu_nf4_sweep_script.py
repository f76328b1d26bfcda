"""scripts/gpu_nf4_sweep.py's non-GPU parts: argument parsing, the per-case sweep loop (run on CPU under the Triton
interpreter with a fake timer: checks, skips of failing and wrong variants), the table and the JSON line."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_nf4_sweep.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_nf4_sweep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments_and_cases():
    s = _script()
    args = s.parse_args([])
    assert len(args.case_list) == 10 and ("8b-down", 1) in args.case_list and ("1b-gate_up", 4) in args.case_list
    assert args.variant_list is None
    args = s.parse_args(["--cases", "1b-qkv:4,8b-down", "--variants", "0,1", "--max-configs", "2"])
    assert args.case_list == [("1b-qkv", 4), ("8b-down", 1)] and args.variant_list == [0, 1]
    with pytest.raises(SystemExit, match="unknown case '9b-qkv'.*1b-qkv"):
        s.parse_args(["--cases", "9b-qkv"])
    assert s.nbytes(28672, 4096) == 28672 * 4096 // 2 + 28672 * 4096 // 64 * 4
    cands = s.candidates([(1, 2, 3, 0, 0), (1, 2, 3, 1, 0), (4, 5, 6, 0, 1)], [1], 0)
    assert cands == {1: [(4, 5, 6, 0, 1)]}
    assert s.candidates([(1, 2, 3, 0, 0), (1, 2, 3, 1, 0)], None, 1) == {0: [(1, 2, 3, 0, 0)]}


def test_sweep_reports_fast_failing_and_wrong_variants(monkeypatch):
    from test_decode_nf4_prmt import _modules

    d, prmt = _modules()
    s = _script()
    real_regs = prmt.code_regs_uncached

    def bad_regs(code, f16):  # the fp16 variant's table corrupted: its results are wrong
        regs = real_regs(code, f16)
        return regs.flip(0) if f16 else regs

    monkeypatch.setattr(prmt, "code_regs", bad_regs)
    ms = {0: 2.0, 1: 1.0, 2: 0.5}
    seen = []

    def time_ms(fn):
        fn()
        return ms[seen[-1]]

    real_launch = d._launch

    def launch(x, packed, absmax, code, y, n, k, bs, cfg):
        seen.append(cfg[4])
        return real_launch(x, packed, absmax, code, y, n, k, bs, cfg)

    monkeypatch.setattr(d, "_launch", launch)
    by = {0: [(8, 512, 2, 0, 0)], 1: [(8, 512, 2, 0, 1), (8, 512, 2, 0, 7)], 2: [(8, 512, 2, 1, 2)]}
    logs = []
    res = s.sweep_case(d, "tiny", 16, 128, 2, by, time_ms, "cpu", log=logs.append)
    res["cublas_us"] = 1.5
    v = res["variants"]
    assert v[0]["best_us"] == 100.0 and v[1]["best_us"] == 50.0 and v[2]["best_us"] is None  # ms of 20 launches
    assert v[1]["timed"] == 1 and len(v[1]["failed"]) == 1 and "VARIANT one of" in v[1]["failed"][0][1]
    assert len(v[2]["wrong"]) == 1 and v[2]["rel_err"] > 0.1
    # bf16 output (and table) rounding; the interpreter's bf16 conversions are cruder than the GPU's
    assert v[0]["rel_err"] < d.TUNE_MAX_ERROR and v[1]["rel_err"] < d.TUNE_MAX_ERROR
    assert any("FAILED" in line for line in logs) and any("WRONG" in line for line in logs)
    assert v[1]["gbps"] == round(s.nbytes(16, 128) / 50e-6 / 1e9)
    table = s.format_table([res])
    assert "prmt-bf16" in table and "1 failed" in table and "1 wrong" in table
    assert "best prmt-bf16 2.00x the word kernel" in table and "cuBLAS bf16 1.50 us" in table
    line = json.dumps(s.summary([res]))
    back = json.loads(line)["cases"][0]
    assert back["variants"]["prmt-bf16"]["us"] == 50.0 and back["variants"]["prmt-f16"]["wrong"] == 1


def test_run_case_adds_cublas_and_the_tuner_pick():
    from test_decode_nf4_prmt import _modules

    d, _ = _modules()
    s = _script()
    res = s.run_case(d, "tiny", 16, 128, 1, {0: [(8, 512, 2, 0, 0)]}, lambda fn: (fn(), 1.0)[1], "cpu")
    assert res["cublas_us"] == 50.0 and res["variants"][0]["best_us"] == 50.0
    assert res["tuner"]["variant"] == "word" and res["tuner"]["rel_err"] < d.TUNE_MAX_ERROR, res["tuner"]
    assert "tuner picks 4/512/2/1/0" in s.format_table([res])


def test_several_rows_also_time_one_program_per_row():
    from test_decode_nf4_prmt import _modules

    d, prmt = _modules()
    s = _script()
    res = s.sweep_case(d, "tiny", 16, 128, 3, {1: [(8, 512, 2, 0, 1)]}, lambda fn: (fn(), 1.0)[1], "cpu")
    assert set(res["variants"]) == {1, "1/row-programs"} and prmt.ROWS_KERNEL is True
    assert res["variants"]["1/row-programs"]["name"] == "prmt-bf16/row-programs"
    assert all(v["rel_err"] < d.TUNE_MAX_ERROR and v["best_us"] == 50.0 for v in res["variants"].values())
    assert "prmt-bf16/row-programs" in s.format_table([res])
    assert "prmt-bf16/row-programs" in json.dumps(s.summary([res]))
