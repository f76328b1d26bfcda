"""GPU check of the split-K decode attention (fastlm.kernels.decode_attention): bf16 correctness at real sizes, and
time per call against the products-and-sums form the engine's compiled decode step uses otherwise.

Shapes: Llama-3.2-1B (32 query / 8 kv heads of 64), Llama-3.1-8B (32 / 8 of 128), Gemma-2-2B (8 / 4 of 256, score
cap 50, sliding window 4096); cache length L in {385, 4096, 32768}; batch 1, 8, 64; every row's query at L//2, then
at L-1. For each (model, L, batch) it captures
  * one call of the op (torch.ops.fastlm.decode_attention, its default form) in a CUDA graph, then copies each
    position into the graph's position tensor and replays it (the engine's way: one capture, any position), and
    compares the output with the reference computed in fp32 (`decode_attention_reference` on fp32 inputs): max abs
    and relative error;
  * the same for the bf16 products-and-sums reference, compiled by inductor (what the engine captures otherwise):
    its error is the bound (each form passes when its max error <= 2 x the reference's + 1e-3);
  * 20 calls of each in one CUDA graph, replayed (fastlm.kernels._triton.graph_replay_ms): microseconds per call,
    and the op's achieved bandwidth (the allowed keys' K and V bytes / time);
  * both forms of the split kernel: products and sums (TENSOR_CORES = False, the default) and tl.dot on tensor
    cores (`_launch(use_dot=True)`), each checked and timed; the summary line says which one was faster how often;
  * with --sweep, both forms at other chunk sizes (`_launch(chunk=...)`), to check split_plan's choice.

Run on the GPU machine (one command; roughly 3-6 minutes, most of it inductor compiling 27 shapes):

    PYTHONPATH=. python scripts/gpu_attention_check.py [--models llama-3.2-1b] [--lengths 385,4096] [--batches 1]
        [--sweep 32,64,128,256] [--no-compile] [--json-out $OUT/attention_check.json]

Smoke-test the script on a CPU (Triton interpreter, fp16, cache lengths 40 and 100, a 24-key window for Gemma,
wall-clock timing of single calls, about two minutes; the numbers mean nothing there):

    PYTHONPATH=. python scripts/gpu_attention_check.py --device cpu

Prints one line per case as it goes, a table last, then one compact JSON line (--json-out writes every timing of
every row). Exit status 1 when any case fails its bound.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

MODELS = {  # heads, kv heads, head dim, score scaling, cap, window, q scale (peaked softmax; Gemma: the cap bites)
    "llama-3.2-1b": dict(h=32, kv=8, d=64, scaling=64 ** -0.5, softcap=None, window=None, q_scale=3.0),
    "llama-3.1-8b": dict(h=32, kv=8, d=128, scaling=128 ** -0.5, softcap=None, window=None, q_scale=3.0),
    "gemma-2-2b": dict(h=8, kv=4, d=256, scaling=256 ** -0.5, softcap=50.0, window=4096, q_scale=10.0),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--lengths", default=None, help="cache lengths (default 385,4096,32768; cpu 40,100)")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8,64; cpu 1,3)")
    p.add_argument("--sweep", default=None,
                   help="chunk sizes to time besides the plan's (default 32,64,128,256; cpu 64; '' for none)")
    p.add_argument("--json-out", default=None, help="also write every row in full (all timings) to this file")
    p.add_argument("--no-compile", action="store_true", help="time the products-and-sums reference eagerly "
                   "(it then holds [B, kv, G, L, D] fp32 products: small shapes only)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models {bad}: allowed {list(MODELS)}")
    args.lengths = _ints(args.lengths or ("40,100" if cpu else "385,4096,32768"))
    args.batches = _ints(args.batches or ("1,3" if cpu else "1,8,64"))
    args.sweep = _ints(("64" if cpu else "32,64,128,256") if args.sweep is None else args.sweep)
    return args


ARGS = parse_args()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before fastlm.kernels decorates its kernels

import torch  # noqa: E402

from fastlm.kernels import decode_attention as da  # noqa: E402
from fastlm.kernels._triton import force_triton, graph_replay_ms  # noqa: E402


def sum_attention(q, k_cache, v_cache, positions, scaling, softcap, window):
    """The engine's compiled decode attention (inference/decoder.py, t == 1 under torch.compile): products and sums
    over the whole cache in fp32 from bf16 inputs, masked softmax, output in the cache's dtype. -> [B, 1, H*D]"""
    b, h, _, d = q.shape
    kv, length = k_cache.shape[1], k_cache.shape[2]
    k, v = k_cache[:b], v_cache[:b]
    qg = q.reshape(b, kv, h // kv, d)
    scores = (qg.unsqueeze(-2).float() * k.unsqueeze(2).float()).sum(-1) * scaling  # [B, kv, G, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(length, device=q.device)
    allowed = key_pos[None, :] <= positions[:, None]
    if window is not None:
        allowed = allowed & (key_pos[None, :] > positions[:, None] - window)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs.unsqueeze(-1) * v.unsqueeze(2).float()).sum(-2).to(v.dtype)  # [B, kv, G, D]
    return out.reshape(b, 1, h * d)


def fp32_reference(q, k, v, positions, cfg, rows_at_once=8):
    """decode_attention_reference on fp32 inputs, a few rows at a time (the fp32 copy of a 32k cache is large)."""
    parts = [da.decode_attention_reference(q[r:r + rows_at_once].float(), k[r:r + rows_at_once],
                                           v[r:r + rows_at_once], positions[r:r + rows_at_once], cfg["scaling"],
                                           cfg["softcap"], cfg["window"])
             for r in range(0, q.shape[0], rows_at_once)]
    return torch.cat(parts)


def errors(got, ref):
    diff = got.float() - ref
    return float(diff.abs().max()), float(diff.norm() / ref.norm().clamp_min(1e-30))


class Timer:
    """Per-call time of fn(): on CUDA 20 calls captured in one graph and replayed; on CPU one wall-clock call."""

    def __init__(self, device: str, reps: int = 20):
        self.cuda, self.reps = device == "cuda", reps

    def capture(self, fn, calls: int):
        fn()  # compile / autotune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = [fn() for _ in range(calls)]
        return graph, out[-1]

    def per_call_us(self, fn):
        """A function that times fn per call (us) at the positions currently in the tensors fn reads."""
        if not self.cuda:
            def wall():
                start = time.perf_counter()
                fn()
                return (time.perf_counter() - start) * 1e6
            return wall
        graph, _ = self.capture(fn, self.reps)
        return lambda: graph_replay_ms(graph, 5) / self.reps * 1e3


def run_case(name, cfg, length, batch, args, timer):
    device, cpu = args.device, args.device == "cpu"
    dtype = torch.float16 if cpu else torch.bfloat16
    window = 24 if (cpu and cfg["window"]) else cfg["window"]
    cfg = dict(cfg, window=window)
    h, kv, d = cfg["h"], cfg["kv"], cfg["d"]
    gen = torch.Generator(device=device).manual_seed(0)
    q = (torch.randn(batch, h, 1, d, device=device, generator=gen) * cfg["q_scale"]).to(dtype)
    k = torch.randn(batch, kv, length, d, device=device, generator=gen).to(dtype)
    v = torch.randn(batch, kv, length, d, device=device, generator=gen).to(dtype)
    positions = torch.zeros(batch, dtype=torch.long, device=device)
    call = (cfg["scaling"], cfg["softcap"], window)
    span = min(length, window or length)
    plan = {kind: da.split_plan(length, window, da.block_sizes(h // kv, d, kind == "dot")[2])[:2]
            for kind in ("sum", "dot")}
    default = "dot" if da.TENSOR_CORES else "sum"

    def launch(kind, chunk=None):
        return lambda: da._launch(q, k, v, positions, *call, chunk=chunk, use_dot=kind == "dot")

    ref_fn = sum_attention
    if not cpu and not args.no_compile:
        torch._dynamo.reset()
        ref_fn = torch.compile(sum_attention, dynamic=False, fullgraph=True)
    fns = {"sum": launch("sum"), "dot": launch("dot"), "ref": lambda: ref_fn(q, k, v, positions, *call)}
    fns[default] = lambda: da.decode_attention(q, k, v, positions, *call)  # the op itself, as the engine calls it

    rows = []
    with force_triton() if cpu else contextlib.nullcontext():
        positions.fill_(length // 2)
        if cpu:
            checked = fns
        else:  # one capture each, replayed at every position: the engine's use
            graphs = {key: timer.capture(fn, 1) for key, fn in fns.items()}
            checked = {key: (lambda g=g, out=out: (g.replay(), out)[1]) for key, (g, out) in graphs.items()}
        timed = {key: timer.per_call_us(fn) for key, fn in fns.items()}
        for kind in ("sum", "dot"):
            for c in args.sweep:
                if c != plan[kind][0] and -(-span // c) <= 512:
                    timed[f"{kind}:{c}"] = timer.per_call_us(launch(kind, c))
        for pos in (length // 2, length - 1):
            positions.fill_(pos)
            truth = fp32_reference(q, k, v, positions, cfg)
            err = {key: errors(fn(), truth) for key, fn in checked.items()}
            us = {key: t() for key, t in timed.items()}
            options = {f"{kind}:{plan[kind][0]}": us[kind] for kind in ("sum", "dot")}
            options.update((key, t) for key, t in us.items() if ":" in key)
            best = min(options, key=options.get)
            keys = min(pos + 1, span)
            gbps = batch * kv * keys * d * 2 * k.element_size() / (us[default] * 1e-6) / 1e9
            row = dict(model=name, L=length, batch=batch, pos=pos, default=default, chunk=plan[default][0],
                       splits=plan[default][1], us_sum=us["sum"], us_dot=us["dot"], us_ref=us["ref"],
                       speedup=us["ref"] / us[default], gbps=gbps, best=best, us_best=options[best], us_all=options,
                       err_sum=err["sum"][0], err_dot=err["dot"][0], err_ref=err["ref"][0],
                       rel_sum=err["sum"][1], rel_dot=err["dot"][1], rel_ref=err["ref"][1],
                       ok=max(err["sum"][0], err["dot"][0]) <= 2 * err["ref"][0] + 1e-3)
            rows.append(row)
            print(f"{name} L={length} B={batch} pos={pos}: sum {us['sum']:.1f} us, dot {us['dot']:.1f} us, "
                  f"ref {us['ref']:.1f} us, best {best} {options[best]:.1f} us, ok {row['ok']}", flush=True)
    return rows


def main() -> int:
    args = ARGS
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the smoke test", file=sys.stderr)
        return 2
    timer = Timer(args.device)
    rows = []
    for name in args.models:
        for length in args.lengths:
            for batch in args.batches:
                rows.extend(run_case(name, MODELS[name], length, batch, args, timer))
                if args.device == "cuda":
                    torch.cuda.empty_cache()  # the case's caches and graphs are gone: give their memory back
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\nus per call: sum / dot = the split kernel's two forms at the planned chunk (op = {rows[0]['default']});"
          " ref = inductor's products-and-sums; x = ref / op; GB/s = the op's allowed K+V bytes / time")
    print(f"{'model':12} {'L':>5} {'B':>2} {'pos':>5} {'chunk x n':>9} {'sum':>7} {'dot':>7} {'ref':>7} {'x':>5} "
          f"{'GB/s':>5} {'best':>8} {'us':>7} {'err sum':>7} {'err dot':>7} {'err ref':>7} ok")
    for r in rows:
        print(f"{r['model']:12} {r['L']:>5} {r['batch']:>2} {r['pos']:>5} {r['chunk']:>4} x {r['splits']:<3} "
              f"{r['us_sum']:7.1f} {r['us_dot']:7.1f} {r['us_ref']:7.1f} {r['speedup']:5.2f} {r['gbps']:5.0f} "
              f"{r['best']:>8} {r['us_best']:7.1f} {r['err_sum']:7.1e} {r['err_dot']:7.1e} {r['err_ref']:7.1e} "
              f"{'yes' if r['ok'] else 'NO'}")
    ratios = sorted(r["us_dot"] / r["us_sum"] for r in rows)
    dot_wins = sum(x < 1 for x in ratios)
    print(f"tensor cores (dot) faster than products-and-sums (sum) in {dot_wins} of {len(rows)} cases; median "
          f"dot/sum time {ratios[len(ratios) // 2]:.2f}")
    ok = all(r["ok"] for r in rows)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    import triton
    cols = ["model", "L", "batch", "pos", "chunk", "us_sum", "us_dot", "us_ref", "best", "us_best", "err_sum",
            "err_dot", "err_ref"]  # short enough for a 12k-character output tail with the table (54 rows)
    compact = [[float(f"{r[c]:.{2 if c.startswith('err') else 3}g}") if isinstance(r[c], float) else r[c]
                for c in cols] for r in rows]
    print(json.dumps(dict(check="decode_attention", device=device, torch=torch.__version__,
                          triton=triton.__version__, ok=ok, failed=[i for i, r in enumerate(rows) if not r["ok"]],
                          dot_wins=dot_wins, cases=len(rows), median_dot_over_sum=round(ratios[len(ratios) // 2], 3),
                          cols=cols, rows=compact), separators=(",", ":")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
