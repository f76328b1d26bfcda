"""GPU check of programmatic dependent launch (PDL, kernels/_triton.py `pdl_mode`) for the decode kernels, in one
command on an H100 (Hopper; elsewhere every kernel launches without PDL and the "on" columns equal "off").

    python scripts/gpu_pdl_check.py                    # all parts, about 4 minutes
    python scripts/gpu_pdl_check.py --parts kernels,chains
    python scripts/gpu_pdl_check.py --nf4-engine       # also the NF4 Llama-3.1-8B engine (needs bitsandbytes)

Parts (each reports its own failure and the run goes on):
  kernels  each changed kernel at real sizes in bf16, PDL on, against its reference (split-K GEMV and NF4 GEMV at
           the Llama-3.2-1B and Llama-3.1-8B projection shapes, decode attention at both models' heads), its output
           with PDL on equal to PDL off, and 20 launches of it in one CUDA graph timed on vs off (a chain of the same
           kernel: with PDL the next GEMV's weights stream in while the previous one drains);
  chains   16 Llama-3.2-1B layers of dependent launches captured in a CUDA graph, on vs off: "layer" is the engine's
           decode layer as it launches today (GEMV, qkv_rope_cache, attention split + combine, GEMV, residual norm,
           GEMV, act, GEMV, residual norm; the epilogue kernels without PDL yet), "pdl-only" the same without the
           epilogues (GEMV -> attention -> GEMV -> GEMV -> GEMV: what every boundary gains once all kernels wait);
           the layer chain's output checked against the torch references, on equal to off; each chain is also timed
           with PDL but no early trigger (_triton.PDL_TRIGGER = False: the next kernel launches as programs exit);
  engine   the real engine built twice on random-weight Llama-3.2-1B with a rank-16 LoRA (PDL on, then off), the
           decode step's CUDA-graph replay timed on both, and the logits of 16 teacher-forced greedy steps compared
           (the same kernels: they should be equal);
  nf4      (--nf4-engine) the same for Llama-3.1-8B with NF4 layers (bitsandbytes), no LoRA.
A table last, then one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastlm.kernels import _triton  # noqa: E402
from fastlm.kernels._triton import graph_replay_ms, launches_ms  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
# (name, N, K, partial sums its consumer adds: decoder.py tunes q/k/v and gate/up with 16, o and down with 4)
GEMV_SHAPES = {"1b": [("qkv", 3072, 2048, 16), ("o", 2048, 2048, 4), ("gate_up", 16384, 2048, 16),
                      ("down", 2048, 8192, 4)],
               "8b": [("qkv", 6144, 4096, 16), ("o", 4096, 4096, 4), ("gate_up", 28672, 4096, 16),
                      ("down", 4096, 14336, 4)]}
ATTN_SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # query heads, kv heads, head dim
FALLBACK_GEMV = (16, 512, 1, 4)  # where cuBLAS won the tuning: the kernel is still checked with this config
NF4_CONFIGS = [(4, 1024, 4, 1, 1), (4, 512, 2, 1, 0)]  # prmt-bf16 and word kernel, both prefetching
ROWS: list[tuple] = []  # (part, case, off, on, note)
RESULT: dict = {"failures": {}, "pdl_available": None}


@contextlib.contextmanager
def pdl(on: bool):
    old = _triton.PDL
    _triton.PDL = on
    try:
        yield
    finally:
        _triton.PDL = old


def run_part(name, fn, *args):
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - every part reports its own failure and the run goes on
        traceback.print_exc()
        RESULT["failures"][name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        ROWS.append((name, "FAILED", "", "", RESULT["failures"][name][:80]))
    RESULT.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)


def timed_pair(fn, launches=20, reps=20, rounds=3) -> tuple[float, float]:
    """(ms off, ms on) of `launches` calls of fn in one CUDA graph, the better of `rounds` alternations."""
    off, on = [], []
    for _ in range(rounds):
        for flag, acc in ((False, off), (True, on)):
            with pdl(flag):
                acc.append(launches_ms(fn, launches, reps, warm=2) / launches)
    return min(off), min(on)


def rel_err(got, ref) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def both(fn):
    """fn() with PDL off and on (eager launches): (off, on) outputs, cloned."""
    with pdl(False):
        off = fn().clone()
    with pdl(True):
        on = fn().clone()
    torch.cuda.synchronize()
    return off, on


# ---------------------------------------------------------------- part 1: the kernels
def part_kernels():
    from fastlm.kernels import decode_gemv, decode_nf4
    from fastlm.kernels.decode_attention import decode_attention, decode_attention_reference

    torch.manual_seed(0)
    out = RESULT.setdefault("kernels", {})
    for model, shapes in GEMV_SHAPES.items():
        for name, n, k, max_splits in shapes:
            w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.02
            x = torch.randn(1, k, device=DEV, dtype=BF16)
            with pdl(True):
                tuned = decode_gemv.gemv_config(w, max_splits=max_splits)
            cfg = tuned or FALLBACK_GEMV
            ref = x.float() @ w.float().t()
            off, on = both(lambda: decode_gemv.gemv_partials(x, w, cfg).sum(0))
            err, same = rel_err(on, ref), torch.equal(on, off)
            parts = torch.empty(decode_gemv.splits(k, cfg), 1, n, device=DEV, dtype=torch.float32)
            t_off, t_on = timed_pair(lambda: decode_gemv._launch(x, w, parts, cfg))
            t_cublas = launches_ms(lambda: F.linear(x, w), 20, 20, warm=2) / 20
            gbs = n * k * 2 / 1e6
            out[f"gemv_{model}_{name}"] = dict(cfg=cfg, tuned=tuned is not None, rel_err=err, on_equals_off=same,
                                               us_off=t_off * 1e3, us_on=t_on * 1e3, us_cublas=t_cublas * 1e3)
            ok = err < 1e-2 and same
            ROWS.append(("kernels", f"gemv {model} {name} {n}x{k}", f"{t_off * 1e3:.1f} us {gbs / t_off:.0f} GB/s",
                         f"{t_on * 1e3:.1f} us {gbs / t_on:.0f} GB/s",
                         f"{'ok' if ok else 'WRONG'} err {err:.1e} cfg {cfg}{'' if tuned else ' (cuBLAS won)'}"
                         f" cuBLAS {t_cublas * 1e3:.1f} us"))
            if not ok:
                RESULT["failures"][f"gemv_{model}_{name}"] = f"rel_err {err:.2e}, on == off: {same}"
    for model, (h, kv, d) in ATTN_SHAPES.items():
        for b, length in ((1, 512), (1, 4096), (4, 4096)):
            q = torch.randn(b, h, 1, d, device=DEV, dtype=BF16)
            kc = torch.randn(b, kv, length, d, device=DEV, dtype=BF16)
            vc = torch.randn(b, kv, length, d, device=DEV, dtype=BF16)
            pos = torch.randint(length // 4, length, (b,), device=DEV)
            scaling = d ** -0.5
            ref = decode_attention_reference(q, kc, vc, pos, scaling)
            off, on = both(lambda: decode_attention(q, kc, vc, pos, scaling))
            err, same = rel_err(on, ref), torch.equal(on, off)
            t_off, t_on = timed_pair(lambda: decode_attention(q, kc, vc, pos, scaling))
            ok = err < 2e-2 and same
            out[f"attention_{model}_b{b}_L{length}"] = dict(rel_err=err, on_equals_off=same, us_off=t_off * 1e3,
                                                            us_on=t_on * 1e3)
            ROWS.append(("kernels", f"attention {model} b{b} L{length}", f"{t_off * 1e3:.1f} us",
                         f"{t_on * 1e3:.1f} us", f"{'ok' if ok else 'WRONG'} err {err:.1e}"))
            if not ok:
                RESULT["failures"][f"attention_{model}_b{b}_L{length}"] = f"rel_err {err:.2e}, on == off: {same}"
    for model, shapes in GEMV_SHAPES.items():
        for name, n, k, _ in shapes:
            x, packed, absmax, code = decode_nf4.tune_inputs(n, k, 64, DEV, 1, BF16)
            ref = decode_nf4.nf4_gemv_reference(x, packed, absmax, code, n, k, 64)
            y = torch.empty(1, n, device=DEV, dtype=BF16)
            for cfg in NF4_CONFIGS if model == "8b" else NF4_CONFIGS[:1]:
                def call(cfg=cfg):
                    decode_nf4._launch(x, packed, absmax, code, y, n, k, 64, cfg)
                    return y
                off, on = both(call)
                err, same = decode_nf4.relative_error(on, ref), torch.equal(on, off)
                t_off, t_on = timed_pair(call)
                gbs = n * k * 0.5 / 1e6
                ok = err < decode_nf4.TUNE_MAX_ERROR and same
                key = f"nf4_{model}_{name}_{decode_nf4.VARIANTS[cfg[4]]}"
                out[key] = dict(cfg=cfg, rel_err=err, on_equals_off=same, us_off=t_off * 1e3, us_on=t_on * 1e3)
                ROWS.append(("kernels", f"nf4 {model} {name} {decode_nf4.VARIANTS[cfg[4]]}",
                             f"{t_off * 1e3:.1f} us {gbs / t_off:.0f} GB/s",
                             f"{t_on * 1e3:.1f} us {gbs / t_on:.0f} GB/s",
                             f"{'ok' if ok else 'WRONG'} err {err:.1e} cfg {cfg}"))
                if not ok:
                    RESULT["failures"][key] = f"rel_err {err:.2e}, on == off: {same}"


# ---------------------------------------------------------------- part 2: chains of dependent launches
def _layer_1b():
    """One Llama-3.2-1B layer's tensors (random), its GEMV configs and a cache at position 300 of 512."""
    from fastlm.kernels import decode_gemv

    torch.manual_seed(1)
    hidden, inter, h, kv, d, length = 2048, 8192, 32, 8, 64, 512
    ws = {"qkv": torch.randn((h + 2 * kv) * d, hidden, device=DEV, dtype=BF16) * 0.02,
          "o": torch.randn(hidden, h * d, device=DEV, dtype=BF16) * 0.02,
          "gate_up": torch.randn(2 * inter, hidden, device=DEV, dtype=BF16) * 0.02,
          "down": torch.randn(hidden, inter, device=DEV, dtype=BF16) * 0.02}
    with pdl(True):
        cfgs = {name: decode_gemv.gemv_config(w, max_splits=16 if name in ("qkv", "gate_up") else 4)
                for name, w in ws.items()}
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    ang = torch.arange(length, device=DEV).float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    return dict(ws=ws, cfgs=cfgs, cos=ang.cos().to(BF16), sin=ang.sin().to(BF16), h=h, kv=kv, d=d, inter=inter,
                kc=torch.randn(1, kv, length, d, device=DEV, dtype=BF16),
                vc=torch.randn(1, kv, length, d, device=DEV, dtype=BF16),
                pos=torch.tensor([300], device=DEV), norm1=1 + 0.1 * torch.randn(hidden, device=DEV, dtype=BF16),
                norm2=1 + 0.1 * torch.randn(hidden, device=DEV, dtype=BF16),
                x=torch.randn(1, hidden, device=DEV, dtype=BF16))


def _proj(t, name, h):
    """The engine's projection: split-K partial sums where the tuner chose the GEMV, else cuBLAS."""
    from fastlm.kernels.decode_gemv import gemv_partials

    cfg = t["cfgs"][name]
    return gemv_partials(h, t["ws"][name], cfg) if cfg is not None else F.linear(h, t["ws"][name])


def _layer(t, x, h, reference=False):
    """decoder._decode_layer without adapters (reference: the ops' torch references instead of the kernels)."""
    from fastlm.kernels import decode_epilogue as ep
    from fastlm.kernels.decode_attention import decode_attention, decode_attention_reference
    from fastlm.kernels.decode_gemv import gemv_reference

    qkv = ep.qkv_rope_cache_reference if reference else ep.qkv_rope_cache
    norm = ep.lora_residual_norm_reference if reference else ep.lora_residual_norm
    act = ep.lora_act_mul_reference if reference else ep.lora_act_mul
    attn = decode_attention_reference if reference else decode_attention
    proj = (lambda name, v: gemv_reference(v, t["ws"][name])) if reference else (lambda name, v: _proj(t, name, v))
    y = proj("qkv", h)
    q = qkv(y, None, None, t["cos"], t["sin"], t["pos"], t["kc"], t["vc"], t["h"], t["kv"], t["d"])
    a = attn(q.view(1, t["h"], 1, t["d"]), t["kc"], t["vc"], t["pos"], t["d"] ** -0.5)
    x, m = norm(x, proj("o", a.reshape(1, -1)), None, None, t["norm1"], 1e-5, False)
    g = act(proj("gate_up", m), None, None, t["inter"], 0, BF16)
    return norm(x, proj("down", g), None, None, t["norm2"], 1e-5, False)


def _pdl_only_layer(t, q, x_in, x_down):
    """The PDL kernels alone, in the layer's order: GEMV -> attention -> GEMV -> GEMV -> GEMV."""
    from fastlm.kernels.decode_attention import decode_attention

    outs = [_proj(t, "qkv", x_in)]
    a = decode_attention(q, t["kc"], t["vc"], t["pos"], t["d"] ** -0.5)
    return outs + [_proj(t, "o", a.reshape(1, -1)), _proj(t, "gate_up", x_in), _proj(t, "down", x_down)]


MODES = {"off": (False, True), "on": (True, True), "on_no_trigger": (True, False)}  # (PDL, PDL_TRIGGER)


def _graphs_by_mode(fn, reps: int = 50, rounds: int = 3):
    """fn captured in a CUDA graph under each of MODES (PDL off; on with the trigger after the wait; on without
    it), each replayed once: ({mode: fn's output}, {mode: best ms per replay over `rounds` alternations})."""
    graphs, outs = {}, {}
    for mode, (on, trigger) in MODES.items():
        old = _triton.PDL_TRIGGER
        _triton.PDL_TRIGGER = trigger
        try:
            with pdl(on):
                for _ in range(2):
                    fn()
                torch.cuda.synchronize()
                graphs[mode] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[mode]):
                    outs[mode] = fn()
        finally:
            _triton.PDL_TRIGGER = old
    for graph in graphs.values():
        graph.replay()
    torch.cuda.synchronize()
    times = {mode: min(graph_replay_ms(graphs[mode], reps) for _ in range(rounds)) for mode in MODES}
    return outs, times


def _chain_row(name, times, check, per_ms=None):
    t_off, t_on, t_nt = times["off"], times["on"], times["on_no_trigger"]
    rate = (lambda t: f" {per_ms / t / 1e9:.2f} TB/s") if per_ms else (lambda t: "")
    ROWS.append(("chains", name, f"{t_off * 1e3:.0f} us{rate(t_off)}", f"{t_on * 1e3:.0f} us{rate(t_on)}",
                 f"{check}; gain {(1 - t_on / t_off) * 100:.1f}% (no trigger: {t_nt * 1e3:.0f} us, "
                 f"{(1 - t_nt / t_off) * 100:.1f}%)"))


def part_chains(layers: int = 16):
    from fastlm.kernels.decode_epilogue import lora_residual_norm_reference

    t = _layer_1b()
    out = RESULT.setdefault("chains", {"gemv_configs": dict(t["cfgs"])})
    h0 = lora_residual_norm_reference(t["x"], torch.zeros_like(t["x"]), None, None, t["norm2"], 1e-5, False)[1]

    def chain():
        x, h = t["x"], h0
        for _ in range(layers):
            x, h = _layer(t, x, h)
        return torch.cat([x, h])

    # the reference chain (every layer writes its k/v at the position before attending, as the kernels do)
    ref_x, ref_h = t["x"], h0
    for _ in range(layers):
        ref_x, ref_h = _layer(t, ref_x, ref_h, reference=True)
    ref = torch.cat([ref_x, ref_h])
    outs, times = _graphs_by_mode(chain)
    err = rel_err(outs["on"], ref)
    same = all(torch.equal(outs[mode], outs["off"]) for mode in MODES)
    out["layer"] = dict(ms=times, rel_err_vs_reference=err, on_equals_off=same)
    ok = err < 5e-2 and same
    _chain_row(f"{layers} x layer (epilogues w/o PDL)", times, f"{'ok' if ok else 'WRONG'} err {err:.1e} vs torch")
    if not ok:
        RESULT["failures"]["chain_layer"] = f"rel_err {err:.2e}, on == off: {same}"

    q = torch.randn(1, t["h"], 1, t["d"], device=DEV, dtype=BF16)
    x_in = torch.randn(1, 2048, device=DEV, dtype=BF16)
    x_down = torch.randn(1, t["inter"], device=DEV, dtype=BF16)

    def pdl_chain():
        return [o for _ in range(layers) for o in _pdl_only_layer(t, q, x_in, x_down)]

    outs, times = _graphs_by_mode(pdl_chain)
    same = all(torch.equal(a, b) for mode in MODES for a, b in zip(outs[mode], outs["off"]))
    weights = sum(w.numel() * 2 for w in t["ws"].values()) * layers
    out["pdl_only"] = dict(ms=times, on_equals_off=same, weight_bytes=weights)
    _chain_row(f"{layers} x GEMV-attn-GEMV-GEMV-GEMV", times, f"{'ok' if same else 'WRONG'} on==off", weights)
    if not same:
        RESULT["failures"]["chain_pdl_only"] = "outputs with PDL on differ from off"


# ---------------------------------------------------------------- part 3: the engine
def _engine(model, on: bool, attention: str | None, max_len: int):
    from fastlm.inference import decoder
    from fastlm.inference.engine import Engine

    old = decoder.COMPILED_DECODE_ATTENTION
    try:
        if attention is not None:
            decoder.COMPILED_DECODE_ATTENTION = attention
        with pdl(on):
            engine = Engine(model, max_slots=1, max_len=max_len)
            start = time.perf_counter()
            engine.warmup([1])
            warm = time.perf_counter() - start
    finally:
        decoder.COMPILED_DECODE_ATTENTION = old
    return engine, warm


def _teacher_forced(engine, prompt, tokens):
    """Logits [steps, V] of the prefill and then the decode steps fed `tokens` (None: greedy; returns the tokens)."""
    logits = [engine.prefill([0], [prompt])[0].float().clone()]
    chosen = [] if tokens is None else list(tokens)
    pos = len(prompt)
    steps = 16 if tokens is None else len(tokens)
    for i in range(steps):
        if tokens is None:
            chosen.append(int(logits[-1].argmax()))
        tok = torch.tensor([chosen[i]], device=DEV)
        logits.append(engine.decode(tok, torch.tensor([pos + i], device=DEV))[0].float().clone())
    return torch.stack(logits), chosen


def _replay_ms(engine, position: int) -> float:
    engine.decode(torch.tensor([1], device=DEV), torch.tensor([position], device=DEV))
    return graph_replay_ms(engine._graphs[1][0], 100)


def engine_pair(key: str, shape: str, lora_rank: int, load_in_4bit: bool, max_len: int = 512):
    from fastlm.bench.generate import build_model

    model = build_model(shape, BF16, DEV, lora_rank=lora_rank, load_in_4bit=load_in_4bit)
    eng_on, warm_on = _engine(model, True, None, max_len)
    attention = eng_on.view.compiled_attention  # the off engine decodes with the same attention form
    eng_off, warm_off = _engine(model, False, attention, max_len)
    info = {}
    for name, eng in (("on", eng_on), ("off", eng_off)):
        graph = eng._graphs.get(1)
        info[name] = dict(graphs=eng.use_graphs and graph is not None, compiled=eng.use_compile,
                          attention=eng.view.compiled_attention, epilogues=eng.view.epilogues)
    if not (info["on"]["graphs"] and info["off"]["graphs"]):
        raise RuntimeError(f"the decode step was not captured in a CUDA graph: {info}")
    prompt = torch.randint(1, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad(), pdl(True):
        l_on, tokens = _teacher_forced(eng_on, prompt, None)
    with torch.no_grad(), pdl(False):
        l_off, _ = _teacher_forced(eng_off, prompt, tokens)
    diff = (l_on - l_off).abs().max().item()
    scale = l_off.abs().max().item()
    agree = (l_on.argmax(-1) == l_off.argmax(-1)).float().mean().item()
    times = {"on": [], "off": []}
    for _ in range(3):
        times["off"].append(_replay_ms(eng_off, max_len // 2))
        times["on"].append(_replay_ms(eng_on, max_len // 2))
    t_on, t_off = min(times["on"]), min(times["off"])
    RESULT[key] = dict(ms_on=t_on, ms_off=t_off, max_abs_logit_diff=diff, logit_scale=scale, argmax_agree=agree,
                       warmup_s_on=warm_on, warmup_s_off=warm_off, engines=info)
    ok = diff <= 1e-3 * max(scale, 1.0) and agree == 1.0
    ROWS.append((key, f"{shape} decode replay (b1, pos {max_len // 2})", f"{t_off:.3f} ms", f"{t_on:.3f} ms",
                 f"{'ok' if ok else 'DIFFERENT'} logits max|diff| {diff:.2e} (scale {scale:.1f}), argmax "
                 f"{agree:.0%}; gain {(1 - t_on / t_off) * 100:.1f}%; attention {attention}"))
    if not ok:
        RESULT["failures"][key] = f"logits differ: max |diff| {diff:.3e}, argmax agreement {agree:.3f}"
    del eng_on, eng_off, model
    torch.cuda.empty_cache()


def part_engine():
    engine_pair("engine", "llama-3.2-1b", 16, False)


def part_nf4():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        RESULT["failures"]["nf4"] = "skipped: bitsandbytes is not installed (carry its wheel)"
        ROWS.append(("nf4", "skipped", "", "", "bitsandbytes not installed"))
        return
    engine_pair("nf4", "llama-3.1-8b", 0, True)


PARTS = {"kernels": part_kernels, "chains": part_chains, "engine": part_engine, "nf4": part_nf4}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="kernels,chains,engine", help="comma-separated: " + ",".join(PARTS))
    ap.add_argument("--nf4-engine", action="store_true", help="also the NF4 Llama-3.1-8B engine (bitsandbytes)")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p] + (["nf4"] if args.nf4_engine else [])
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; choose from {sorted(PARTS)}")
    if not torch.cuda.is_available():
        print("gpu_pdl_check needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    RESULT["device"] = torch.cuda.get_device_name()
    RESULT["pdl_available"] = _triton.pdl_mode(torch.device(DEV, torch.cuda.current_device())) != 0
    import triton

    RESULT["versions"] = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    if not RESULT["pdl_available"]:
        print("note: PDL is off on this device or by FASTLM_PDL; 'on' runs equal 'off'", flush=True)
    for name in dict.fromkeys(parts):
        run_part(name, PARTS[name])
    RESULT["total_s"] = round(time.perf_counter() - start, 1)
    widths = [max(len(str(r[i])) for r in ROWS + [("part", "case", "PDL off", "PDL on", "check")]) for i in range(4)]
    print()
    print(f"{RESULT['device']}: torch {torch.__version__}, triton {triton.__version__}, PDL available "
          f"{RESULT['pdl_available']}, {RESULT['total_s']} s")
    for row in [("part", "case", "PDL off", "PDL on", "check")] + ROWS:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + str(row[4]))
    print(json.dumps(RESULT, default=str))
    return 1 if any(not v.startswith("skipped") for v in RESULT["failures"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
