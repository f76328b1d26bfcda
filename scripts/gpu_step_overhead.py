"""Where the engine's batch-1 time goes besides the decode graph: prefill (time to first token) and the per-token
bookkeeping of the scheduler's whole-step CUDA graph, before and after compiling them (GPU, one command).

Measures on a real-shape random model (default llama-3.2-1b bf16, LoRA r16, prompt 128, 256 new tokens):
  * TTFT of the prompt: eager prefill against the compiled prefill (median of 5 after warm-up; prefill + argmax +
    host read), the compiled prefill's compile time and its logits against the eager ones;
  * the model-only decode replay (`engine.decode` back to back) and the whole-step graph replay (the scheduler's
    captured decode + sampling + bookkeeping for greedy batch 1, replayed back to back), bookkeeping eager vs fused;
  * the kernels one whole step launches (torch.profiler over the uncaptured step the graph holds), model and
    bookkeeping apart, before/after;
  * the loop ms per token of `engine_run(engine, [prompt], 256, "cuda")` (what `fastlm bench generate` times),
    old path (eager prefill, eager bookkeeping) against the new one, and the greedy tokens of both compared (the
    bookkeeping alone must give identical tokens; the compiled prefill may differ by bf16 rounding).
Each part reports its own failure and the run goes on. A table last, then one JSON line.

    python scripts/gpu_step_overhead.py [--shape llama-3.2-1b] [--lora-rank 16] [--prompt-len 128] [--new-tokens 256]

`--device cpu --shape tiny-llama` is a dry run of the flow (fp32, prefill compiled by inductor's C++ backend, no
graphs: the whole-step parts report that they found none).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastlm.bench.generate import build_model, engine_run  # noqa: E402
from fastlm.inference.engine import Engine  # noqa: E402
from fastlm.inference.sampling import SamplingParams  # noqa: E402
from fastlm.inference.scheduler import Request, Scheduler  # noqa: E402

T0 = time.perf_counter()
ERRORS: dict[str, str] = {}
DEVICE = "cuda"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def part(name: str):
    """Decorator: run a part, report (not raise) its failure."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - report and go on
                ERRORS[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log(f"{name} FAILED: {ERRORS[name]}")
                traceback.print_exc(limit=4)
                return None
        return run
    return wrap


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def set_mode(engine, prefill_compiled: bool | None = None, fused: bool | None = None) -> None:
    """Old or new path on the same engine: the prefill's compile switch and the scheduler state's fused
    bookkeeping (its captured whole steps dropped, so the next steps are captured in the chosen mode)."""
    if prefill_compiled is not None:
        engine.use_prefill_compile = prefill_compiled and engine._prefill_fns is not None
        engine._prefill_graphs.enabled = False  # "before" is the eager prefill, not the captured one (the bench's)
    if fused is not None:
        state = getattr(engine, "_scheduler_state", None)
        if state is None:
            Scheduler(engine)  # creates the engine's state; the scheduler itself is dropped at once
            state = engine._scheduler_state
        state.graphs.clear()
        state.fused_bookkeeping = fused


# ---------------------------------------------------------------------------------------------------- parts
@part("prefill compile")
def compile_prefill(engine, prompt, res):
    if not engine.use_prefill_compile:
        raise RuntimeError("the engine does not compile its prefill here (compile_prefill off)")
    sync()
    t = time.perf_counter()
    engine.prefill([0], [prompt])
    sync()
    res["prefill_compile_s"] = round(time.perf_counter() - t, 2)
    res["prefill_compiled_active"] = bool(engine.use_prefill_compile)
    log(f"prefill compiled in {res['prefill_compile_s']:.1f} s (active: {engine.use_prefill_compile})")


@part("decode warm-up")
def warm_decode(engine, res):
    t = time.perf_counter()
    engine.warmup([1])
    res["decode_warmup_s"] = round(time.perf_counter() - t, 2)
    res["decode_attention"] = engine.view.compiled_attention if engine.use_compile else "eager"
    log(f"decode compile + capture {res['decode_warmup_s']:.1f} s (attention {res['decode_attention']})")


def _ttft_once(engine, prompt) -> float:
    sync()
    t = time.perf_counter()
    logits = engine.prefill([0], [prompt])
    logits.argmax(-1).item()
    return (time.perf_counter() - t) * 1e3


@part("ttft")
def ttft(engine, prompt, res):
    compiled_ok = engine._prefill_fns is not None and engine.use_prefill_compile
    logits = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        if compiled and not compiled_ok:
            continue
        set_mode(engine, prefill_compiled=compiled)
        for _ in range(2):
            _ttft_once(engine, prompt)
        times = [_ttft_once(engine, prompt) for _ in range(5)]
        res[f"ttft_ms_{name}"] = round(statistics.median(times), 3)
        logits[name] = engine.prefill([0], [prompt]).clone()
        if DEVICE == "cuda":  # how much of the TTFT is GPU work (the rest is launch overhead: graphs would cut it)
            count, _, gpu_ms = _kernels(lambda: engine.prefill([0], [prompt]), reps=3, with_time=True)
            res[f"prefill_kernels_{name}"], res[f"prefill_gpu_ms_{name}"] = count, round(gpu_ms, 3)
            log(f"prefill {name}: {count:.0f} GPU ops, {gpu_ms:.2f} ms of GPU time")
        log(f"TTFT {name:8s} prefill of {len(prompt)} tokens + argmax: median {res[f'ttft_ms_{name}']:.2f} ms "
            f"({', '.join(f'{x:.2f}' for x in times)})")
    if len(logits) == 2:
        a, b = logits["eager"], logits["compiled"]
        res["prefill_logits_max_abs_diff"] = round((a - b).abs().max().item(), 5)
        res["prefill_logits_max_abs"] = round(a.abs().max().item(), 3)
        res["prefill_argmax_equal"] = bool(torch.equal(a.argmax(-1), b.argmax(-1)))
        log(f"compiled prefill logits vs eager: max |diff| {res['prefill_logits_max_abs_diff']:.4f} "
            f"(max |logit| {res['prefill_logits_max_abs']:.2f}), argmax equal: {res['prefill_argmax_equal']}")
    set_mode(engine, prefill_compiled=compiled_ok)


@part("decode replay")
def decode_replay(engine, res, n=200):
    tok = torch.ones(1, dtype=torch.long, device=DEVICE)
    pos = torch.full((1,), min(150, engine.max_len - 1), dtype=torch.long, device=DEVICE)
    for _ in range(10):
        engine.decode(tok, pos)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        engine.decode(tok, pos)
    sync()
    res["decode_replay_ms"] = round((time.perf_counter() - t) / n * 1e3, 4)
    log(f"model-only decode replay: {res['decode_replay_ms']:.4f} ms")


def _kernels(fn, reps=5, with_time=False):
    """CUDA events (kernels, memcpy, memset) of fn() in launch order, per call: (count, names of one call), and
    their summed GPU time per call in ms with_time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    per = len(events) / reps
    names = [e.name for e in events][:int(per)]
    if not with_time:
        return per, names
    us = sum(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) for e in events)
    return per, names, us / reps / 1e3


@part("whole step")
def whole_step(engine, prompt, res, label: str, fused: bool, n=200):
    set_mode(engine, fused=fused)
    sched = Scheduler(engine, sync_every=16)
    sched.add(Request(list(prompt), SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)))
    sync()
    t = time.perf_counter()
    sched.step()  # prefill, one uncaptured step (compiles the fused bookkeeping), the capture, replays
    sync()
    res[f"step_capture_s_{label}"] = round(time.perf_counter() - t, 2)
    graphs = [g for k, g in sched.state.graphs.items() if k[0] == 1 and g is not None]
    if fused and not sched.state.fused_bookkeeping:
        raise RuntimeError("the fused bookkeeping fell back to eager (see the warning above)")
    if not graphs:
        raise RuntimeError("no whole-step graph was captured for batch 1 (see the warnings above)")
    graph = graphs[0]

    def reset(p):
        sched.pos[0], sched.n_gen[0], sched.done[0], sched.max_new[0] = p, 0, False, 10 ** 6

    reset(50)  # 200 replays walk positions 50..250: mean 150, the decode replay's position
    for _ in range(5):
        graph.replay()
    reset(50)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        graph.replay()
    sync()
    res[f"step_replay_ms_{label}"] = round((time.perf_counter() - t) / n * 1e3, 4)
    reset(150)
    rows = sched.state.rows[1]
    whole, names = _kernels(lambda: sched._decode_once(1, rows, [0], captured=True))
    model, _ = _kernels(lambda: engine.step(sched.cur[:1], sched.pos[:1]))
    res[f"step_kernels_{label}"] = whole
    res[f"model_kernels_{label}"] = model
    res[f"bookkeeping_kernels_{label}"] = whole - model
    log(f"whole step ({label}): replay {res[f'step_replay_ms_{label}']:.4f} ms, kernels {whole:.0f} "
        f"(model {model:.0f}, bookkeeping {whole - model:.0f}); first step incl. capture "
        f"{res[f'step_capture_s_{label}']:.1f} s")
    print(f"    bookkeeping kernels ({label}), in launch order:")
    for name in names[int(model):]:
        print(f"      {name[:100]}")
    sched.slot_req[0] = None  # the request is abandoned; the next scheduler takes the state
    del sched


@part("loop")
def loop(engine, prompt, res, label: str, prefill_compiled: bool, fused: bool, new_tokens: int):
    set_mode(engine, prefill_compiled=prefill_compiled, fused=fused)
    engine_run(engine, [prompt], 8, DEVICE)  # captures the whole step in this mode
    runs = []
    for _ in range(3):
        tps, first, out = engine_run(engine, [prompt], new_tokens, DEVICE)
        runs.append((tps, first, out[0].token_ids))
    tps, first, tokens = sorted(runs, key=lambda r: r[0])[1]
    total_s = new_tokens / tps
    res[f"loop_tok_s_{label}"] = round(tps, 2)
    res[f"loop_ms_per_token_{label}"] = round(1e3 / tps, 4)
    res[f"loop_ms_per_token_after_ttft_{label}"] = round((total_s - first) / max(1, new_tokens - 1) * 1e3, 4)
    res[f"loop_ttft_ms_{label}"] = round(first * 1e3, 3)
    log(f"engine_run {label}: {tps:.1f} tokens/s = {1e3 / tps:.4f} ms/token (TTFT {first * 1e3:.2f} ms, "
        f"{res[f'loop_ms_per_token_after_ttft_{label}']:.4f} ms/token after it)")
    return tokens


def compare_tokens(res, name: str, a, b, n: int):
    if a is None or b is None:
        return
    a, b = a[:n], b[:n]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    res[f"tokens_equal_{name}"] = same == n and len(a) == len(b) == n
    res[f"tokens_same_prefix_{name}"] = same
    log(f"greedy tokens {name}: {same}/{n} equal" + ("" if same == n else f" (first difference at {same})"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the flow")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_step_overhead.py needs a CUDA GPU (or --device cpu for a dry run)")
    res = dict(shape=args.shape, lora_rank=args.lora_rank, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
               device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = build_model(args.shape, dtype, DEVICE, lora_rank=args.lora_rank)
    engine = Engine(model, max_slots=1, max_len=args.prompt_len + args.new_tokens + 1,
                    compile_prefill=True)
    vocab = engine.vocab_size
    prompt = torch.randint(3, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    log(f"model built: {args.shape}, LoRA r{args.lora_rank}, fused={engine.view.fused}, "
        f"compile={engine.use_compile}, compile_prefill={engine.use_prefill_compile}")

    compile_prefill(engine, prompt, res)
    warm_decode(engine, res)
    res["warmup_s"] = round(res.get("prefill_compile_s", 0) + res.get("decode_warmup_s", 0), 2)
    ttft(engine, prompt, res)
    decode_replay(engine, res)
    whole_step(engine, prompt, res, "before", fused=False)
    whole_step(engine, prompt, res, "after", fused=True)
    prefill_new = engine._prefill_fns is not None and engine.use_prefill_compile
    old = loop(engine, prompt, res, "before", prefill_compiled=False, fused=False, new_tokens=args.new_tokens)
    mid = loop(engine, prompt, res, "fused_only", prefill_compiled=False, fused=True, new_tokens=args.new_tokens)
    new = loop(engine, prompt, res, "after", prefill_compiled=prefill_new, fused=True, new_tokens=args.new_tokens)
    for label in ("before", "after"):  # what the loop spends per token beyond the graph: the host syncs
        loop_ms, step_ms = res.get(f"loop_ms_per_token_after_ttft_{label}"), res.get(f"step_replay_ms_{label}")
        if loop_ms is not None and step_ms is not None:
            res[f"host_residual_ms_{label}"] = round(loop_ms - step_ms, 4)
    compare_tokens(res, "bookkeeping", old, mid, args.new_tokens)  # must be identical: same model math
    compare_tokens(res, "new_vs_old_64", old, new, min(64, args.new_tokens))  # prefill rounding may move a tie
    res["errors"] = ERRORS

    def cell(key, fmt="{:.3f}"):
        v = res.get(key)
        return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                      else str(v))

    rows = [
        ("TTFT prefill+argmax (ms)", cell("ttft_ms_eager", "{:.2f}"), cell("ttft_ms_compiled", "{:.2f}")),
        ("prefill GPU time (ms)", cell("prefill_gpu_ms_eager", "{:.2f}"), cell("prefill_gpu_ms_compiled", "{:.2f}")),
        ("prefill GPU ops", cell("prefill_kernels_eager", "{:.0f}"), cell("prefill_kernels_compiled", "{:.0f}")),
        ("prefill compile (s)", "-", cell("prefill_compile_s", "{:.1f}")),
        ("warm-up: prefill + decode (s)", cell("decode_warmup_s", "{:.1f}"), cell("warmup_s", "{:.1f}")),
        ("decode replay, model only (ms)", cell("decode_replay_ms", "{:.4f}"), cell("decode_replay_ms", "{:.4f}")),
        ("whole-step replay (ms)", cell("step_replay_ms_before", "{:.4f}"), cell("step_replay_ms_after", "{:.4f}")),
        ("whole-step kernels", cell("step_kernels_before", "{:.0f}"), cell("step_kernels_after", "{:.0f}")),
        ("  of which bookkeeping", cell("bookkeeping_kernels_before", "{:.0f}"),
         cell("bookkeeping_kernels_after", "{:.0f}")),
        ("engine_run ms/token", cell("loop_ms_per_token_before", "{:.4f}"), cell("loop_ms_per_token_after", "{:.4f}")),
        ("engine_run tokens/s", cell("loop_tok_s_before", "{:.1f}"), cell("loop_tok_s_after", "{:.1f}")),
        ("engine_run TTFT (ms)", cell("loop_ttft_ms_before", "{:.2f}"), cell("loop_ttft_ms_after", "{:.2f}")),
        ("ms/token after TTFT", cell("loop_ms_per_token_after_ttft_before", "{:.4f}"),
         cell("loop_ms_per_token_after_ttft_after", "{:.4f}")),
        ("  minus whole-step replay (host)", cell("host_residual_ms_before", "{:.4f}"),
         cell("host_residual_ms_after", "{:.4f}")),
        ("tokens equal, bookkeeping only", "", cell("tokens_equal_bookkeeping")),
        ("tokens equal, new vs old (64)", "", cell("tokens_equal_new_vs_old_64") + " (prefix "
         + cell("tokens_same_prefix_new_vs_old_64", "{}") + ")"),
    ]
    print()
    print(f"{'':34s} {'before':>12s} {'after':>12s}")
    for name, before, after in rows:
        print(f"{name:34s} {before:>12s} {after:>12s}")
    if ERRORS:
        print(f"failed parts: {', '.join(ERRORS)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
