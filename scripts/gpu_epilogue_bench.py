"""GPU check and timing of the decode-step epilogue kernels (fastlm/kernels/decode_epilogue.py) at real shapes.

    python scripts/gpu_epilogue_bench.py            # 1B and 8B shapes, correctness + old/new + config sweep
    python scripts/gpu_epilogue_bench.py --quick    # 1B only, no sweep

For Llama-3.2-1B (hidden 2048, intermediate 8192, 32/8 heads x 64) and Llama-3.1-8B (4096, 14336, 32/8 x 128), with
no adapter and LoRA r16 compact (the slices share B^T's rows: what the engine builds for one adapter per module),
split-K partial sums S = 1 (bf16 y, cuBLAS) and S = 4 (fp32), 1 and 4 rows, plus S = 16 (the most the engine lets
q/k/v and gate/up leave; o and down are held to 4) compact at 1 row and 1B block-diagonal r16 at S = 4, each op is
checked in bf16 against its `*_reference` (max abs error, old and new kernels) and timed old vs new with
CUDA-graph replays (`_triton.launches_ms`) two ways: "cold", launches rotating over copies of the inputs that span
twice the L2 (B^T, x and the norm weight come from DRAM in the real step; its partial sums are L2-hot, so cold is a
slight upper bound), and "hot" (the same inputs every launch, all in L2). "old" is the kernels as profiled in the
engine at 1.366 ms/token (commit 987a550, copied below: residual norm 4.1 us, activation 5.8 us, qkv 3.2 us a launch
on the H100). The sweep times each op's launch configs (block, num_warps) cold at rows 1, S 4, compact r16. The
split residual norm also runs 100 times on fresh inputs, and its ticket counters must be zero after the graphs: the
row's last-program handoff must never lose a row. The first run compiles ~85 small kernels (~1 minute or more).

Prints per-case lines, the sweep, then a short table (one row per op and model) and one JSON line. Exit status 1
when a new kernel's error is over the bf16 tolerance or a counter is left non-zero.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastlm.kernels.decode_epilogue as epi  # noqa: E402
from fastlm.kernels._triton import jit, launches_ms, next_pow2, tl  # noqa: E402

MODELS = {"1B": dict(hidden=2048, inter=8192, heads=32, kv=8, head_dim=64),
          "8B": dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128)}
RANK = 16
SWEEP = {"norm": [(64, 2), (128, 2), (128, 4), (256, 4), (256, 8)],  # (block, num_warps) each
         "act": [(32, 2), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8)],
         "qkv": [(8, 1), (16, 1), (16, 2), (32, 1), (32, 2), (64, 2), (64, 4)]}
LAUNCHES_PER_TOKEN_1B = {"norm": 32, "act": 16, "qkv": 16}
RACE_RUNS = 100  # launches of the split residual norm on fresh inputs


# ---------------------------------------------------------------- the kernels before (commit 987a550), frozen
@jit
def _old_summed(ptr, offs, mask, stride_s, S: tl.constexpr):
    v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, S):
        v += tl.load(ptr + s * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@jit
def _old_adapter(acc, xa_ptr, stride_xas, bt_ptr, cols, ok, R, stride_bt, BLOCK_R: tl.constexpr, S_XA: tl.constexpr):
    if BLOCK_R > 1:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        xa = _old_summed(xa_ptr, r, r_ok, stride_xas, S_XA)
        bt = tl.load(bt_ptr + r[:, None] * stride_bt + cols[None, :], mask=r_ok[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(bt.to(tl.float32) * xa[:, None], axis=0)
    return acc


@jit
def _old_qkv_kernel(y_ptr, xa_ptr, bt_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, stride_ys, stride_y,
                    stride_xas, stride_xa, stride_bt, stride_cos, stride_q, stride_cb, stride_ch, stride_cl, R, XQ, XK,
                    XV, H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_R: tl.constexpr, S: tl.constexpr, S_XA: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK_HALF)
    ok = i < HALF
    col = head * (2 * HALF) + i
    xoff = tl.where(head < H, XQ, tl.where(head < H + KV, XK, XV))
    xa_row = xa_ptr + row * stride_xa + xoff
    lo = _old_summed(y_ptr + row * stride_y, col, ok, stride_ys, S)
    hi = _old_summed(y_ptr + row * stride_y, col + HALF, ok, stride_ys, S)
    lo = _old_adapter(lo, xa_row, stride_xas, bt_ptr, col, ok, R, stride_bt, BLOCK_R, S_XA)
    hi = _old_adapter(hi, xa_row, stride_xas, bt_ptr, col + HALF, ok, R, stride_bt, BLOCK_R, S_XA)
    out_ty = q_ptr.dtype.element_ty
    lo = lo.to(out_ty).to(tl.float32)
    hi = hi.to(out_ty).to(tl.float32)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    if head < H + KV:
        c_lo = tl.load(cos_ptr + pos * stride_cos + i, mask=ok, other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + pos * stride_cos + HALF + i, mask=ok, other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + pos * stride_cos + i, mask=ok, other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + pos * stride_cos + HALF + i, mask=ok, other=0.0).to(tl.float32)
        lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
    epi._qkv_store(lo, hi, i, ok, row, head, pos, q_ptr, kc_ptr, vc_ptr, stride_q, stride_cb, stride_ch, stride_cl,
                   H, KV, HALF)


@jit
def _old_act_kernel(y_ptr, xa_ptr, bt_ptr, h_ptr, stride_ys, stride_y, stride_xas, stride_xa, stride_bt, stride_h, R,
                    INTER, XG, XU, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, S: tl.constexpr, S_XA: tl.constexpr):
    row = tl.program_id(0)  # silu only (both models')
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < INTER
    xa_row = xa_ptr + row * stride_xa
    g = _old_summed(y_ptr + row * stride_y, cols, ok, stride_ys, S)
    u = _old_summed(y_ptr + row * stride_y, INTER + cols, ok, stride_ys, S)
    g = _old_adapter(g, xa_row + XG, stride_xas, bt_ptr, cols, ok, R, stride_bt, BLOCK_R, S_XA)
    u = _old_adapter(u, xa_row + XU, stride_xas, bt_ptr, INTER + cols, ok, R, stride_bt, BLOCK_R, S_XA)
    out_ty = h_ptr.dtype.element_ty
    g = g.to(out_ty).to(tl.float32)
    u = u.to(out_ty).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(out_ty).to(tl.float32)
    tl.store(h_ptr + row * stride_h + cols, (a * u).to(out_ty), mask=ok)


@jit
def _old_norm_kernel(x_ptr, y_ptr, xa_ptr, bt_ptr, w_ptr, s_ptr, out_ptr, stride_x, stride_ys, stride_y, stride_xas,
                     stride_xa, stride_bt, stride_s, stride_out, R, XOFF, HIDDEN, eps, BLOCK: tl.constexpr,
                     BLOCK_R: tl.constexpr, S: tl.constexpr, S_XA: tl.constexpr):
    row = tl.program_id(0)  # llama norm only
    cols = tl.arange(0, BLOCK)
    ok = cols < HIDDEN
    a = _old_summed(y_ptr + row * stride_y, cols, ok, stride_ys, S)
    a = _old_adapter(a, xa_ptr + row * stride_xa + XOFF, stride_xas, bt_ptr, cols, ok, R, stride_bt, BLOCK_R, S_XA)
    ty = s_ptr.dtype.element_ty
    a = a.to(ty).to(tl.float32)
    s = (tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32) + a).to(ty)
    tl.store(s_ptr + row * stride_s + cols, s, mask=ok)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / HIDDEN + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, ((s * rstd).to(ty).to(tl.float32) * w).to(ty), mask=ok)


def _old_warps(elements: int, low: int = 1, high: int = 32) -> int:
    return max(low, min(high, next_pow2(max(1, elements // 2048))))


def old_qkv(y, xa, bt, offs, cos, sin, pos, kc, vc, h, kv, d):
    y, s, sys_, syr = epi._splits(y)
    b = y.shape[1]
    q = torch.empty(b, h * d, dtype=kc.dtype, device=y.device)
    xa_, s_xa, sxs, sxr, bt, r, sbt, block_r = epi._lora_args(y, xa, bt)
    half = next_pow2(d // 2)
    _old_qkv_kernel[(b, h + 2 * kv)](y, xa_, bt, cos, sin, pos, q, kc, vc, sys_, syr, sxs, sxr, sbt, cos.stride(0),
                                     q.stride(0), kc.stride(0), kc.stride(1), kc.stride(2), r, *offs[:3], H=h, KV=kv,
                                     HALF=d // 2, BLOCK_HALF=half, BLOCK_R=block_r, S=s, S_XA=s_xa,
                                     num_warps=_old_warps(2 * block_r * half, high=8))
    return q


def old_act(y, xa, bt, offs, inter, act, dtype):
    y, s, sys_, syr = epi._splits(y)
    b = y.shape[1]
    h = torch.empty(b, inter, dtype=dtype, device=y.device)
    xa_, s_xa, sxs, sxr, bt, r, sbt, block_r = epi._lora_args(y, xa, bt)
    block = 1024 if block_r == 1 else max(32, 2048 // block_r)
    _old_act_kernel[(b, -(-inter // block))](y, xa_, bt, h, sys_, syr, sxs, sxr, sbt, h.stride(0), r, inter, *offs[:2],
                                             BLOCK=block, BLOCK_R=block_r, S=s, S_XA=s_xa, num_warps=4)
    return h


def old_norm(x, y, xa, bt, offs, weight, eps, gemma):
    b, hidden = x.shape
    y, s_y, sys_, syr = epi._splits(y)
    s, out = torch.empty_like(x), torch.empty_like(x)
    xa_, s_xa, sxs, sxr, bt, r, sbt, block_r = epi._lora_args(y, xa, bt)
    block = next_pow2(hidden)
    _old_norm_kernel[(b,)](x, y, xa_, bt, weight, s, out, x.stride(0), sys_, syr, sxs, sxr, sbt, s.stride(0),
                           out.stride(0), r, offs[0], hidden, eps, BLOCK=block, BLOCK_R=block_r, S=s_y, S_XA=s_xa,
                           num_warps=_old_warps(block_r * block, low=4))
    return s, out


# ---------------------------------------------------------------- cases
def projection(sizes, lora, splits, rows, device, dtype, gen):
    """A projection's output as the engine's GEMVs write it (y with the adapters' x A^T as its last columns; bf16
    for one split, fp32 partial sums for several) and the `lora` argument: None, compact (B^T [r, N], offsets) or
    block-diagonal B^T [r * slices, N]."""
    n, slices = sum(sizes), len(sizes)
    ranks = RANK * slices if lora else 0
    shape = (rows, n + ranks) if splits == 1 else (splits, rows, n + ranks)
    y_full = torch.randn(*shape, generator=gen, device=device) * (splits ** -0.5)
    y_full = y_full.to(dtype) if splits == 1 else y_full
    y, xa = y_full[..., :n], (y_full[..., n:] if lora else None)
    if not lora:
        return y, xa, None
    b = torch.randn(RANK, n, generator=gen, device=device) * 0.05
    if lora == "compact":
        return y, xa, (b.to(dtype), [RANK * i for i in range(slices)])
    block_diag = torch.zeros(ranks, n, device=device)
    start = 0
    for i, size in enumerate(sizes):
        block_diag[RANK * i:RANK * (i + 1), start:start + size] = b[:, start:start + size]
        start += size
    return y, xa, block_diag.to(dtype)


def make_case(op, dims, lora, splits, rows, device, dtype=torch.bfloat16, seed=0, gemma=False, reference=True):
    """(new(config) -> outputs, old() -> outputs, reference outputs or None, bytes one launch reads) for one op and
    shape."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, inter, h, kv, d = (dims[k] for k in ("hidden", "inter", "heads", "kv", "head_dim"))
    if op == "qkv":
        y, xa, arg = projection([h * d, kv * d, kv * d], lora, splits, rows, device, dtype, gen)
        length = 64
        theta = torch.arange(length, device=device)[:, None] * (10000.0 ** (-torch.arange(0, d, 2, device=device) / d))
        cos, sin = (torch.cat([f(theta), f(theta)], -1).to(dtype) for f in (torch.cos, torch.sin))
        pos = torch.randint(0, length, (rows,), generator=gen, device=device)
        kc = torch.zeros(rows, kv, length, d, dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        bt, offs = epi._adapter_parts(arg, 3)
        rk, rv = kc.clone(), vc.clone()
        ref = (epi.qkv_rope_cache_reference(y, xa, arg, cos, sin, pos, rk, rv, h, kv, d), rk, rv) if reference else None

        def new(config=None):
            return (epi._launch_qkv(y, xa, bt, offs, cos, sin, pos, kc, vc, h, kv, d, config=config), kc, vc)

        def old():
            return (old_qkv(y, xa, bt, offs, cos, sin, pos, kc, vc, h, kv, d), kc, vc)
    elif op == "act":
        y, xa, arg = projection([inter, inter], lora, splits, rows, device, dtype, gen)
        bt, offs = epi._adapter_parts(arg, 2)
        ref = (epi.lora_act_mul_reference(y, xa, arg, inter, epi.SILU, dtype),) if reference else None

        def new(config=None):
            return (epi._launch_act(y, xa, bt, offs, inter, epi.SILU, dtype, config=config),)

        def old():
            return (old_act(y, xa, bt, offs, inter, epi.SILU, dtype),)
    else:
        y, xa, arg = projection([hidden], lora, splits, rows, device, dtype, gen)
        x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
        w = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype)
        bt, offs = epi._adapter_parts(arg, 1)
        ref = epi.lora_residual_norm_reference(x, y, xa, arg, w, 1e-5, gemma) if reference else None

        def new(config=None):
            return epi._launch_norm(x, y, xa, bt, offs, w, 1e-5, gemma, config=config)

        def old():
            return old_norm(x, y, xa, bt, offs, w, 1e-5, gemma)
    reads = sum(t.numel() * t.element_size() for t in (y, xa, bt) if t is not None)
    return new, old, ref, reads


def max_error(got, ref) -> float:
    return max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))


def tolerance(ref) -> float:
    """bf16: the kernels round once where the op-by-op reference rounds several times (2 ulp of the largest value)."""
    return 2 * 2.0 ** -7 * max(1.0, max(r.float().abs().max().item() for r in ref))


def us_per_launch(calls) -> float:
    """Microseconds a launch: the callables (one launch each) captured in one CUDA graph, replayed."""
    return launches_ms(lambda: [c() for c in calls], launches=1, reps=5, warm=1) * 1000 / len(calls)


def timings(op, dims, lora, splits, rows, device, configs):
    """{name: (cold us, hot us)} for old, new (default config) and each of `configs` (cold only)."""
    new, old, _, reads = make_case(op, dims, lora, splits, rows, device)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    copies = max(8, min(512, math.ceil(2 * l2 / max(reads, 1))))
    rotating = [make_case(op, dims, lora, splits, rows, device, seed=i + 1, reference=False)[:2]
                for i in range(copies)]
    out = {"old": (us_per_launch([o for _, o in rotating]), us_per_launch([old] * 20)),
           "new": (us_per_launch([n for n, _ in rotating]), us_per_launch([new] * 20))}
    for cfg in configs:
        out[cfg] = (us_per_launch([lambda n=n, c=cfg: n(c) for n, _ in rotating]), float("nan"))
    return out


def race_check(dims, device, dtype, runs: int) -> float:
    """The split residual norm on fresh inputs `runs` times (rows 4, S 4, compact): the largest error / tolerance."""
    worst = 0.0
    for i in range(runs):
        new, _, ref, _ = make_case("norm", dims, "compact", 4, 4, device, dtype, seed=1000 + i)
        worst = max(worst, max_error(new(), ref) / tolerance(ref))
    return worst


def check_and_time(models, device, dtype, timer) -> tuple[bool, list[dict]]:
    """Every case's errors (old and new against the reference) and timings; also gemma's norm and the race check."""
    ok, detail = True, []
    for model in models:
        dims = MODELS[model]
        # S = 16: the most partial sums the engine lets q/k/v and gate/up GEMVs leave (o and down: 4, decoder.py)
        grid = [(lora, s, rows) for lora in ("none", "compact") for s in (1, 4) for rows in (1, 4)]
        grid += [("compact", 16, 1)] + ([("blockdiag", 4, 1), ("blockdiag", 4, 4)] if model == "1B" else [])
        for op in ("norm", "act", "qkv"):
            for lora, splits, rows in grid:
                adapters = None if lora == "none" else lora
                new, old, ref, _ = make_case(op, dims, adapters, splits, rows, device, dtype)
                tol = tolerance(ref)
                e_new, e_old = max_error(new(), ref), max_error(old(), ref)
                ok &= e_new <= tol
                t = timer(op, dims, adapters, splits, rows, device, [])
                row = dict(op=op, model=model, lora=lora, S=splits, rows=rows, err_old=e_old, err_new=e_new,
                           tol=tol, old_cold=t["old"][0], new_cold=t["new"][0], old_hot=t["old"][1],
                           new_hot=t["new"][1])
                detail.append(row)
                print(f"{op:4s} {model} {lora:9s} S={splits} rows={rows}  err old {e_old:.4f} new {e_new:.4f}"
                      f" (tol {tol:.4f})  cold old {row['old_cold']:6.2f} new {row['new_cold']:6.2f} us  "
                      f"hot old {row['old_hot']:6.2f} new {row['new_hot']:6.2f} us", flush=True)
        new, _, ref, _ = make_case("norm", dims, "compact", 4, 4, device, dtype, gemma=True)
        e = max_error(new(), ref)
        ok &= e <= tolerance(ref)
        print(f"norm {model} gemma compact S=4 rows=4  err new {e:.4f} (tol {tolerance(ref):.4f})")
        worst = race_check(dims, device, dtype, RACE_RUNS)
        ok &= worst <= 1.0
        print(f"norm {model} {RACE_RUNS} launches on fresh inputs: worst error / tol {worst:.3f}")
    return ok, detail


def sweep(models, device, dtype, timer) -> tuple[bool, dict]:
    """Each op's configs at rows 1, S 4, compact r16: errors (rows 4), then cold timings, fastest first."""
    ok, sweeps = True, {}
    for model in models:
        dims = MODELS[model]
        for op in ("norm", "act", "qkv"):
            configs = [c for c in SWEEP[op] if op != "qkv" or c[0] <= dims["head_dim"] // 2]
            for cfg in configs:  # a config that computes wrong is no candidate
                new, _, ref, _ = make_case(op, dims, "compact", 4, 4, device, dtype)
                if max_error(new(cfg), ref) > tolerance(ref):
                    print(f"{op} {model} config {cfg}: WRONG")
                    ok = False
            t = timer(op, dims, "compact", 4, 1, device, configs)
            ranked = sorted((v[0], k) for k, v in t.items() if isinstance(k, tuple))
            sweeps[f"{op}/{model}"] = {str(k): round(v, 3) for v, k in ranked}
            print(f"sweep {op} {model} (cold us, rows 1, S 4, compact r16): "
                  + "  ".join(f"{k}:{v:.2f}" for v, k in ranked) + f"  | old {t['old'][0]:.2f} new {t['new'][0]:.2f}")
    return ok, sweeps


def summarize(models, detail, sweeps) -> tuple[list[dict], dict]:
    """The short table (rows 1, S 4, compact r16, cold: the engine's batch-1 LoRA step; errors over all cases) and
    the 1B epilogue time per token."""
    print(f"\n{'op':5s}{'model':6s}{'old us':>8s}{'new us':>8s}{'best cfg':>12s}{'best us':>8s}"
          f"{'max err old':>12s}{'max err new':>12s}  (cold, rows 1, S 4, compact r16; errors over all cases)")
    summary, per_token = [], {"old": 0.0, "new": 0.0, "best": 0.0}
    for model in models:
        for op in ("norm", "act", "qkv"):
            cases = [r for r in detail if r["op"] == op and r["model"] == model]
            main_row = next(r for r in cases if r["lora"] == "compact" and r["S"] == 4 and r["rows"] == 1)
            ranked = sweeps.get(f"{op}/{model}", {})
            best_cfg, best_us = next(iter(ranked.items())) if ranked else ("-", main_row["new_cold"])
            s = dict(op=op, model=model, old_us=round(main_row["old_cold"], 3), new_us=round(main_row["new_cold"], 3),
                     best_config=best_cfg, best_us=round(best_us, 3), max_err_old=max(r["err_old"] for r in cases),
                     max_err_new=max(r["err_new"] for r in cases))
            summary.append(s)
            print(f"{op:5s}{model:6s}{s['old_us']:8.2f}{s['new_us']:8.2f}{best_cfg:>12s}{s['best_us']:8.2f}"
                  f"{s['max_err_old']:12.4f}{s['max_err_new']:12.4f}")
            if model == "1B":
                n = LAUNCHES_PER_TOKEN_1B[op]
                per_token["old"] += n * s["old_us"]
                per_token["new"] += n * s["new_us"]
                per_token["best"] += n * min(s["best_us"], s["new_us"])
    return summary, per_token


def run(models, device, do_sweep: bool, dtype=torch.bfloat16, timer=None) -> dict:
    """Everything; returns the JSON payload (`timer`: `timings` unless a test stands in for the GPU)."""
    start, timer = time.time(), timer or timings
    ok, detail = check_and_time(models, device, dtype, timer)
    counters_zero = not bool(epi.row_counters(device, 4).any())
    ok &= counters_zero
    swept_ok, sweeps = sweep(models, device, dtype, timer) if do_sweep else (True, {})
    ok &= swept_ok
    summary, per_token = summarize(models, detail, sweeps)
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
    print(f"1B per token (32 norms, 16 activations, 16 qkv): old {per_token['old']:.1f} us, new "
          f"{per_token['new']:.1f} us, best configs {per_token['best']:.1f} us; counters zero: {counters_zero}; "
          f"{'OK' if ok else 'FAILED'} in {time.time() - start:.0f} s")
    return dict(ok=ok, device=name, per_token_1b_us={k: round(v, 1) for k, v in per_token.items()},
                summary=summary, sweeps=sweeps, counters_zero=counters_zero, seconds=round(time.time() - start, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1B only, no config sweep")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    payload = run(["1B"] if args.quick else ["1B", "8B"], torch.device("cuda"), not args.quick)
    print(json.dumps({"decode_epilogue_bench": payload}))
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
