"""NF4 dequant-GEMV sweep on the GPU (one command): every kernel variant x block config at the batch-1 decode shapes.

For each case (Llama-3.2-1B and Llama-3.1-8B projections, blocksize 64, one row; two shapes also with four rows):
each variant's configs of `fastlm.kernels.decode_nf4._CONFIGS` (the engine tuner's candidates) and
`SWEEP_ONLY_CONFIGS` are launched once and checked against the float32
dequantize-then-matmul reference (relative L2 error, and the largest element error over max |reference|), then
timed as 20 launches in a CUDA graph (what the engine's tuner does). A config that fails to compile or run, or is
wrong (relative error > decode_nf4.TUNE_MAX_ERROR), is reported and skipped. Per case: the best time and GB/s of each
variant (packed bytes + float32 absmax), its config, its errors, the floor at 3 TB/s and cuBLAS' bf16 GEMV; then what
`nf4_gemv_config` (the engine's tuner) picks and how long its tuning took, and that pick's error through the
`fastlm::nf4_gemv` op. A table, one JSON line last.

    PYTHONPATH=$PWD/.gpu-site:$PWD python scripts/gpu_nf4_sweep.py [--cases 1b-qkv,8b-down] [--variants 0,1]
        [--no-tuner] [--max-configs N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (N, K): the decode projections (q/k/v and gate/up fused as the engine fuses them)
SHAPES = {
    "1b-qkv": (3072, 2048), "1b-o": (2048, 2048), "1b-gate_up": (16384, 2048), "1b-down": (2048, 8192),
    "8b-qkv": (6144, 4096), "8b-o": (4096, 4096), "8b-gate_up": (28672, 4096), "8b-down": (4096, 14336),
}
ROWS4 = ("1b-gate_up", "8b-qkv")  # also timed with 4 rows (batch 4 / speculative decode)
BLOCKSIZE = 64
FLOOR_TBPS = 3.0
LAUNCHES = 20
NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="all",
                    help="comma-separated shape names (%s), each optionally with :ROWS; 'all' = every shape with "
                         "1 row plus %s with 4" % (", ".join(SHAPES), ", ".join(ROWS4)))
    ap.add_argument("--variants", default="all", help="comma-separated variant ids of decode_nf4.VARIANTS, or 'all'")
    ap.add_argument("--max-configs", type=int, default=0, help="at most this many configs per variant (0: all)")
    ap.add_argument("--no-tuner", action="store_true", help="skip timing nf4_gemv_config (the engine's tuner)")
    ap.add_argument("--reps", type=int, default=5, help="graph replays averaged per timing")
    args = ap.parse_args(argv)
    args.case_list = parse_cases(args.cases)
    args.variant_list = None if args.variants == "all" else [int(v) for v in args.variants.split(",") if v]
    return args


def parse_cases(spec: str) -> list[tuple[str, int]]:
    """'all' or 'name[:rows],...' -> [(name, rows)]; unknown names raise SystemExit naming the known ones."""
    if spec == "all":
        return [(name, 1) for name in SHAPES] + [(name, 4) for name in ROWS4]
    out = []
    for item in filter(None, spec.split(",")):
        name, _, rows = item.partition(":")
        if name not in SHAPES:
            raise SystemExit(f"unknown case {name!r}: expected one of {', '.join(SHAPES)} (optionally :ROWS)")
        out.append((name, int(rows or 1)))
    return out


def nbytes(n: int, k: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes one GEMV must read: the packed codes and the float32 absmax (x and y are negligible)."""
    return n * k // 2 + n * k // blocksize * 4


def candidates(configs, variant_list, max_configs: int) -> dict[int, list[tuple]]:
    """variant -> its configs (in _CONFIGS order), filtered."""
    by: dict[int, list[tuple]] = {}
    for cfg in configs:
        if variant_list is None or cfg[4] in variant_list:
            by.setdefault(cfg[4], []).append(tuple(cfg))
    if max_configs:
        by = {v: c[:max_configs] for v, c in by.items()}
    return by


def errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, max element error / max |ref|)."""
    y, ref = y.float(), ref.float()
    rel = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    mx = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return rel, mx


def make_inputs(n: int, k: int, rows: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=g).to(device)
    absmax = (torch.rand(n * k // BLOCKSIZE, generator=g) * 0.09 + 0.01).to(device)
    x = torch.randn(rows, k, generator=g).to(device=device, dtype=torch.bfloat16)
    code = torch.tensor(NF4_CODE, device=device)
    return x, packed, absmax, code


def sweep_case(d, name, n, k, rows, by_variant, time_ms, device, log=print) -> dict:
    """One shape: every variant's configs checked, then timed (time_ms(fn) -> ms of LAUNCHES launches). With
    several rows, variant 1 is also run as one program per row ("prmt-bf16/row-programs", the rows kernel off)."""
    x, packed, absmax, code = make_inputs(n, k, rows, device)
    ref = d.nf4_gemv_reference(x.float(), packed, absmax, code, n, k, BLOCKSIZE).float()
    y = torch.empty(rows, n, device=device, dtype=x.dtype)
    res = dict(case=name, n=n, k=k, rows=rows, bytes=nbytes(n, k),
               floor_us=round(nbytes(n, k) / (FLOOR_TBPS * 1e12) * 1e6, 2), variants={})
    runs = [(v, cfgs, True) for v, cfgs in by_variant.items()]
    if rows > 1 and 1 in by_variant:
        runs.append((1, by_variant[1], False))
    prmt = sys.modules[d.launch_prmt.__module__]
    for variant, cfgs, rows_kernel in runs:
        prmt.ROWS_KERNEL = rows_kernel
        try:
            res["variants"][variant if rows_kernel else f"{variant}/row-programs"] = _sweep_variant(
                d, name, n, k, rows, variant, cfgs, time_ms, x, packed, absmax, code, ref, y, log)
        finally:
            prmt.ROWS_KERNEL = True
    return res


def _sweep_variant(d, name, n, k, rows, variant, cfgs, time_ms, x, packed, absmax, code, ref, y, log) -> dict:
    """One variant's configs at one case: each checked against ref, then timed; the best kept."""
    vr = dict(name=d.VARIANTS.get(variant, str(variant)), best_us=None, config=None, rel_err=0.0, max_err=0.0,
              failed=[], wrong=[], timed=0)
    if not sys.modules[d.launch_prmt.__module__].ROWS_KERNEL:
        vr["name"] += "/row-programs"
    for cfg in cfgs:
        try:
            y.fill_(float("nan"))
            d._launch(x, packed, absmax, code, y, n, k, BLOCKSIZE, cfg)
            rel, mx = errors(y, ref)
            vr["rel_err"], vr["max_err"] = max(vr["rel_err"], rel), max(vr["max_err"], mx)
            if not rel <= d.TUNE_MAX_ERROR:
                vr["wrong"].append(("/".join(map(str, cfg)), f"{rel:.3g}"))
                log(f"  WRONG {name} rows={rows} variant {vr['name']} config {cfg}: relative error {rel:.3g}")
                continue
            us = time_ms(lambda c=cfg: d._launch(x, packed, absmax, code, y, n, k, BLOCKSIZE, c)) / LAUNCHES * 1e3
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile or run is reported, not fatal
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            vr["failed"].append(("/".join(map(str, cfg)), f"{type(exc).__name__}: {first}"))
            log(f"  FAILED {name} rows={rows} variant {vr['name']} config {cfg}: {type(exc).__name__}: {first}")
            continue
        vr["timed"] += 1
        if vr["best_us"] is None or us < vr["best_us"]:
            vr["best_us"], vr["config"] = round(us, 2), "/".join(map(str, cfg))
    if vr["best_us"] is not None:
        vr["gbps"] = round(nbytes(n, k) / (vr["best_us"] * 1e-6) / 1e9)
    return vr


def format_table(results: list[dict]) -> str:
    """The per-case table: one line per variant, then the case's floor, cuBLAS and tuner pick."""
    lines = [f"{'case':<14}{'rows':>4}  {'variant':<24}{'best us':>9}{'GB/s':>7}  {'config':<16}{'rel err':>9}"
             f"{'max err':>9}  notes"]
    for r in results:
        head = f"{r['case']:<14}{r['rows']:>4}"
        for variant, v in r["variants"].items():
            us = f"{v['best_us']:.2f}" if v["best_us"] is not None else "-"
            gb = str(v.get("gbps", "-"))
            notes = []
            if v["failed"]:
                notes.append(f"{len(v['failed'])} failed ({v['failed'][0][1][:60]})")
            if v["wrong"]:
                notes.append(f"{len(v['wrong'])} wrong (rel {v['wrong'][0][1]})")
            lines.append(f"{head}  {v['name']:<24}{us:>9}{gb:>7}  {str(v['config'] or '-'):<16}"
                         f"{v['rel_err']:>9.2e}{v['max_err']:>9.2e}  {'; '.join(notes)}")
            head = " " * 18
        extra = [f"floor@{FLOOR_TBPS:g}TB/s {r['floor_us']:.2f} us"]
        if r.get("cublas_us") is not None:
            extra.append(f"cuBLAS bf16 {r['cublas_us']:.2f} us")
        word = r["variants"].get(0, {}).get("best_us")
        best = min(((v["best_us"], v["name"]) for v in r["variants"].values() if v["best_us"] is not None),
                   default=None)
        if best and word:
            extra.append(f"best {best[1]} {word / best[0]:.2f}x the word kernel")
        if r.get("tuner"):
            t = r["tuner"]
            extra.append(f"tuner picks {t.get('config')} in {t.get('seconds')} s, op rel err {t.get('rel_err')}")
        lines.append(" " * 20 + "; ".join(extra))
    return "\n".join(lines)


def summary(results: list[dict]) -> dict:
    """The JSON line: per case the best of each variant, the floor, cuBLAS, the tuner's pick."""
    return dict(cases=[dict(case=r["case"], rows=r["rows"], floor_us=r["floor_us"], cublas_us=r.get("cublas_us"),
                            tuner=r.get("tuner"),
                            variants={v["name"]: dict(us=v["best_us"], gbps=v.get("gbps"), config=v["config"],
                                                      rel_err=float(f"{v['rel_err']:.3g}"),
                                                      max_err=float(f"{v['max_err']:.3g}"),
                                                      failed=len(v["failed"]), wrong=len(v["wrong"]))
                                      for v in r["variants"].values()}) for r in results])


def run_case(d, name, n, k, rows, by_variant, time_ms, dev, tuner: bool = True, log=print) -> dict:
    """sweep_case, then cuBLAS' bf16 GEMV at the shape, then (tuner) the engine's path: nf4_gemv_config's pick and
    its error through the op."""
    res = sweep_case(d, name, n, k, rows, by_variant, time_ms, dev, log=log)
    x, packed, absmax, code = make_inputs(n, k, rows, dev)
    try:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        res["cublas_us"] = round(time_ms(lambda: torch.nn.functional.linear(x, w)) / LAUNCHES * 1e3, 2)
        del w
    except Exception as exc:  # noqa: BLE001
        log(f"  cuBLAS timing failed: {exc}")
    if tuner:
        try:
            ts = time.perf_counter()
            cfg = d.nf4_gemv_config(n, k, BLOCKSIZE, dev, rows, packed)
            sec = round(time.perf_counter() - ts, 2)
            ref = d.nf4_gemv_reference(x.float(), packed, absmax, code, n, k, BLOCKSIZE)
            rel, _ = errors(d.nf4_gemv(x, packed, absmax, code, n, k, BLOCKSIZE, config=cfg), ref)
            res["tuner"] = dict(config="/".join(map(str, cfg)), variant=d.VARIANTS[cfg[4]], seconds=sec,
                                rel_err=float(f"{rel:.3g}"))
        except Exception as exc:  # noqa: BLE001
            res["tuner"] = dict(error=f"{type(exc).__name__}: {str(exc)[:160]}")
    return res


def graph_time_ms(reps: int):
    from fastlm.kernels.decode_nf4 import graph_launch_ms

    return lambda fn: graph_launch_ms(fn, LAUNCHES, reps)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_nf4_sweep.py needs a CUDA GPU")
    from fastlm.kernels import decode_nf4 as d

    t0 = time.perf_counter()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}; variants {d.VARIANTS}", flush=True)
    by_variant = candidates(d._CONFIGS + d.SWEEP_ONLY_CONFIGS, args.variant_list, args.max_configs)
    time_ms = graph_time_ms(args.reps)
    results = []
    for name, rows in args.case_list:
        n, k = SHAPES[name]
        t = time.perf_counter()
        results.append(run_case(d, name, n, k, rows, by_variant, time_ms, dev, tuner=not args.no_tuner))
        print(f"{name} rows={rows}: {round(time.perf_counter() - t, 1)} s", flush=True)
        torch.cuda.empty_cache()
    print()
    print(format_table(results))
    out = summary(results)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
