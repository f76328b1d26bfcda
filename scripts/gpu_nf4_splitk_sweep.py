"""Split-K NF4 GEMV against the looping NF4 kernels on the GPU (one command), at the batch-1 decode shapes.

For each shape (Llama-3.2-1B and Llama-3.1-8B projections, blocksize 64, one row of x): the looping kernel the
engine's tuner picks (`decode_nf4.nf4_gemv_config`) and every config of `decode_nf4_splitk.CONFIGS` (split counts up
to 16) are checked against the float32 reference (relative L2 error) and timed two ways: 20 launches on one weight
in a CUDA graph (the tuners' timing: the weight stays in the 50 MB L2 for the 1B shapes) and 20 launches walking
over copies of the weight that together exceed 2x the L2 (every launch reads DRAM, as a decode step does). Then
what `nf4_partials_config` picks with the consumers' split limits (16 for q/k/v and gate/up, 4 for o and down).
A table per shape and one JSON line last.

    PYTHONPATH=$PWD/.gpu-site:$PWD python scripts/gpu_nf4_splitk_sweep.py [--cases 1b-qkv,8b-down]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "1b-qkv": (3072, 2048, 16), "1b-o": (2048, 2048, 4), "1b-gate_up": (16384, 2048, 16),
    "1b-down": (2048, 8192, 4), "8b-qkv": (6144, 4096, 16), "8b-o": (4096, 4096, 4),
    "8b-gate_up": (28672, 4096, 16), "8b-down": (4096, 14336, 4),
}
BLOCKSIZE = 64
LAUNCHES = 20
L2_BYTES = 50 * 2 ** 20


def nbytes(n: int, k: int) -> int:
    return n * k // 2 + n * k // BLOCKSIZE * 4


def cold_copies(n: int, k: int) -> int:
    return max(2, -(-2 * L2_BYTES // nbytes(n, k)) + 1)


def time_walk(launch, copies) -> float:
    """ms per launch: max(LAUNCHES, copies) launches in a graph, launch i reading copy i % len(copies)."""
    from fastlm.kernels._triton import launches_ms

    state = {"i": 0}
    launches = max(LAUNCHES, len(copies))

    def step():
        launch(copies[state["i"] % len(copies)])
        state["i"] += 1

    return launches_ms(step, launches, reps=5, warm=len(copies)) / launches


def run_case(name: str) -> dict:
    from fastlm.kernels import decode_nf4 as d
    from fastlm.kernels import decode_nf4_splitk as s

    n, k, max_splits = SHAPES[name]
    dev = torch.device("cuda")
    x, packed, absmax, code = d.tune_inputs(n, k, BLOCKSIZE, dev, 1, torch.bfloat16)
    ref = d.nf4_gemv_reference(x, packed, absmax, code, n, k, BLOCKSIZE).float()
    copies = [(packed.clone(), absmax.clone()) for _ in range(cold_copies(n, k))]
    rows = []
    loop_cfg = d.nf4_gemv_config(n, k, BLOCKSIZE, dev, 1, packed, torch.bfloat16)
    y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    d._launch(x, packed, absmax, code, y, n, k, BLOCKSIZE, loop_cfg)
    warm = time_walk(lambda c: d._launch(x, packed, absmax, code, y, n, k, BLOCKSIZE, loop_cfg), copies[:1])
    cold = time_walk(lambda c: d._launch(x, c[0], c[1], code, y, n, k, BLOCKSIZE, loop_cfg), copies)
    rows.append({"kernel": "loop", "cfg": list(loop_cfg), "splits": 1, "err": d.relative_error(y, ref),
                 "warm_us": warm * 1e3, "cold_us": cold * 1e3})
    for cfg in s.CONFIGS:
        sp = s.splits(k, cfg)
        if sp > 16:
            continue
        out = torch.empty(sp, 1, n, device=dev, dtype=torch.float32)
        try:
            s._launch(x, packed, absmax, code, out, n, k, BLOCKSIZE, cfg)
            err = d.relative_error(out.sum(0), ref)
            warm = time_walk(lambda c, cf=cfg: s._launch(x, packed, absmax, code, out, n, k, BLOCKSIZE, cf),
                             copies[:1])
            cold = time_walk(lambda c, cf=cfg: s._launch(x, c[0], c[1], code, out, n, k, BLOCKSIZE, cf), copies)
        except Exception as exc:  # noqa: BLE001 - report and go on
            rows.append({"kernel": "splitk", "cfg": list(cfg), "splits": sp, "failed": str(exc).splitlines()[0][:120]})
            continue
        rows.append({"kernel": "splitk", "cfg": list(cfg), "splits": sp, "err": err, "warm_us": warm * 1e3,
                     "cold_us": cold * 1e3})
    pick = s.nf4_partials_config(n, k, BLOCKSIZE, packed, code, torch.bfloat16, max_splits, loop_config=loop_cfg)
    return {"case": name, "n": n, "k": k, "bytes": nbytes(n, k), "rows": rows, "pick": pick,
            "max_splits": max_splits}


def report(res: dict) -> None:
    mb = res["bytes"] / 1e6
    print(f"\n{res['case']} N={res['n']} K={res['k']} ({mb:.1f} MB; floor at 3 TB/s {mb / 3:.2f} us); "
          f"tuner pick with <= {res['max_splits']} splits: {res['pick']}")
    print(f"{'kernel':8} {'config':18} {'S':>3} {'rel err':>9} {'warm us':>8} {'cold us':>8} {'cold TB/s':>9}")
    for r in sorted(res["rows"], key=lambda r: r.get("cold_us", 1e9)):
        if "failed" in r:
            print(f"{r['kernel']:8} {str(r['cfg']):18} {r['splits']:>3} failed: {r['failed']}")
            continue
        print(f"{r['kernel']:8} {str(r['cfg']):18} {r['splits']:>3} {r['err']:9.2e} {r['warm_us']:8.2f} "
              f"{r['cold_us']:8.2f} {mb / r['cold_us']:9.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script times kernels on a GPU")
        return 1
    results = []
    for name in filter(None, args.cases.split(",")):
        if name not in SHAPES:
            raise SystemExit(f"unknown case {name!r}: expected one of {', '.join(SHAPES)}")
        results.append(run_case(name))
        report(results[-1])
    summary = {}
    for res in results:
        ok = [r for r in res["rows"] if "cold_us" in r]
        best = min(ok, key=lambda r: r["cold_us"])
        fitting = [r for r in ok if r["kernel"] == "splitk" and r["splits"] <= res["max_splits"]]
        best_fit = min(fitting, key=lambda r: r["cold_us"]) if fitting else None
        summary[res["case"]] = {"loop_cold_us": round(res["rows"][0]["cold_us"], 2),
                                "best_cold_us": round(best["cold_us"], 2), "best": [best["kernel"], best["cfg"]],
                                "best_fitting_cold_us": best_fit and round(best_fit["cold_us"], 2),
                                "pick": res["pick"]}
    print(json.dumps({"nf4_splitk_sweep": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
