"""Where the engine's batch-1 decode time goes, on a real-size random model (GPU, one command).

Per case: the captured decode step alone (graph replays back to back, ms/token), the full scheduler loop (what
`fastlm bench generate` times), the kernels one compiled decode step launches (count, summed GPU time, the top
ones by time) and the floor (weight bytes / copy bandwidth). Then the NF4 dequant-GEMV kernels at the decode
shapes against cuBLAS' bf16 GEMV and the bandwidth floor. Prints tables, one JSON line last.

    python scripts/gpu_engine_profile.py [--cases lora16,lora16+kernel,lora0,nf4] [--shape llama-3.2-1b] [--no-nf4-sweep]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastlm.bench.generate import build_model, copy_bandwidth_gbps, engine_run, weight_bytes  # noqa: E402
from fastlm.inference.engine import Engine  # noqa: E402


def replay_ms(engine, n=200):
    tok = torch.ones(1, dtype=torch.long, device="cuda")
    pos = torch.full((1,), 150, dtype=torch.long, device="cuda")
    for _ in range(10):
        engine.decode(tok, pos)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        engine.decode(tok, pos)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


SEQUENCE = 0  # --sequence N: print the first N kernels of one step in order


def kernel_profile(engine, reps=10, top=12):
    from torch.profiler import ProfilerActivity, profile

    fn = engine._step_fn()
    tok = torch.ones(1, dtype=torch.long, device="cuda")
    pos = torch.full((1,), 150, dtype=torch.long, device="cuda")
    for _ in range(3):
        fn(tok, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn(tok, pos)
        torch.cuda.synchronize()
    seq = [(e.name[:90], e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
           for e in prof.events() if e.device_type.name == "CUDA"]
    if SEQUENCE:  # one step's kernels in launch order: what one layer launches, and how long each takes
        step = len(seq) // reps
        print(f"    one step, {step} kernels in order (us):")
        for name, us in seq[:min(step, SEQUENCE)]:
            print(f"      {us:7.1f}  {name}")
    by = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = e.name[:70]
        by[name][0] += 1
        by[name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    count = sum(v[0] for v in by.values()) / reps
    total_us = sum(v[1] for v in by.values()) / reps
    tops = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    return count, total_us, [(k, v[0] / reps, v[1] / reps) for k, v in tops]


def nf4_sweep(shapes):
    """Every NF4 GEMV config at each decode shape: the best time (CUDA-graph timing, as the
    engine's tuner does), its error against the dequantize-then-matmul reference, and its GB/s."""
    from fastlm.kernels import decode_nf4 as d
    from fastlm.kernels._triton import launches_ms

    rows = []
    code = torch.tensor(sorted(torch.randn(16).tolist()), device="cuda")
    for name, n, k in shapes:
        packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device="cuda")
        absmax = torch.rand(n * k // 64, device="cuda") + 0.1
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        ref = d.nf4_gemv_reference(x, packed, absmax, code, n, k, 64).float()
        nbytes = n * k / 2 + n * k / 64 * 4
        res = dict(shape=name, n=n, k=k, floor_us=round(nbytes / 3.0e12 * 1e6, 2))

        def timed(fn):
            return launches_ms(fn, 20, 5) / 20 * 1e3

        res["bf16_cublas_us"] = round(timed(lambda: torch.nn.functional.linear(x, w)), 2)
        for cfg in d._CONFIGS:
            try:
                d._launch(x, packed, absmax, code, y, n, k, 64, cfg)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                us = timed(lambda: d._launch(x, packed, absmax, code, y, n, k, 64, cfg))
            except Exception as exc:  # noqa: BLE001
                print("config failed", name, cfg, str(exc)[:100])
                continue
            if not err < 1e-2:
                print("config WRONG", name, cfg, err)
                continue
            if us < res.get("nf4_us", 1e9):
                res.update(nf4_us=round(us, 2), nf4_cfg="/".join(map(str, cfg)), nf4_gbps=round(nbytes / us / 1e3))
        rows.append(res)
        print(res, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--cases", default="lora16,lora0,nf4")
    ap.add_argument("--no-nf4-sweep", action="store_true")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per case, by summed time")
    ap.add_argument("--sequence", type=int, default=0, help="print the first N kernels of one step in order")
    args = ap.parse_args()
    global SEQUENCE
    SEQUENCE = args.sequence
    bw = copy_bandwidth_gbps("cuda")
    out = dict(copy_gbps=round(bw, 1), cases=[])
    table = []
    from fastlm.inference import decoder

    for case in args.cases.split(","):
        # "lora16+kernel": the Triton decode-attention op inside the compiled step instead of products and sums
        case, _, variant = case.partition("+")
        decoder.COMPILED_DECODE_ATTENTION = variant or "sum"  # "+kernel", "+auto"
        torch._dynamo.reset()
        rank = int(case[4:]) if case.startswith("lora") else 0
        model = build_model(args.shape, torch.bfloat16, "cuda", lora_rank=rank, load_in_4bit=case == "nf4")
        wb = weight_bytes(model)
        engine = Engine(model, max_slots=1, max_len=385)
        t = time.perf_counter()
        engine.warmup([1])
        warm = time.perf_counter() - t
        rep = replay_ms(engine)
        prompt = torch.randint(3, 1000, (1, 128)).tolist()
        engine_run(engine, prompt, 8, "cuda")
        tps, _, _ = engine_run(engine, prompt, 256, "cuda")
        count, total_us, tops = kernel_profile(engine, top=args.top)
        floor_ms = wb / (bw * 1e9) * 1e3
        row = dict(case=case + ("+" + variant if variant else ""), weight_gb=round(wb / 1e9, 3), warmup_s=round(warm, 1), replay_ms=round(rep, 3),
                   loop_tok_s=round(tps, 1), loop_ms=round(1e3 / tps, 3), kernels=count,
                   kernel_sum_ms=round(total_us / 1e3, 3), floor_ms=round(floor_ms, 3))
        table.append(row)
        print(row, flush=True)
        for name, c, us in tops:
            print(f"    {us:8.1f} us  x{c:5.1f}  {name}")
        out["cases"].append(dict(row, top=[(n, c, round(u, 1)) for n, c, u in tops]))
        del engine, model
        torch.cuda.empty_cache()
    if not args.no_nf4_sweep:
        shapes = [("1b qkv", 3072, 2048), ("1b o", 2048, 2048), ("1b gate_up", 16384, 2048), ("1b down", 2048, 8192),
                  ("8b qkv", 6144, 4096), ("8b o", 4096, 4096), ("8b gate_up", 28672, 4096), ("8b down", 4096, 14336)]
        out["nf4"] = nf4_sweep(shapes)
    print("\ncase      weight_GB  floor_ms  replay_ms  loop_ms  tok/s   kernels  kernel_sum_ms  warmup_s")
    for r in table:
        print(f"{r['case']:9s} {r['weight_gb']:9.3f} {r['floor_ms']:9.3f} {r['replay_ms']:10.3f} {r['loop_ms']:8.3f} "
              f"{r['loop_tok_s']:7.1f} {r['kernels']:8.1f} {r['kernel_sum_ms']:13.3f} {r['warmup_s']:9.1f}")
    for r in out.get("nf4", []):
        print(r)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
