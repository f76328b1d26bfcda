"""What holds fastlm's GPU memory at the peak of a LoRA training step (H100 tuning aid for the 0.22x memory target).

Sets up the fastlm side exactly as `python -m fastlm.bench.train` does (the same flags; the model built by the
bench's own worker process, then loaded, batched and stepped with fastlm/bench/train_worker.py's functions),
records the CUDA allocator's history (torch.cuda.memory._record_memory_history) over the warm-up steps and one more
step, and for every step prints the peak (replayed from the history and as torch.cuda.max_memory_allocated), then for
the step holding the process peak (and the last step, if another) the live memory at that moment grouped by
allocation site and the events leading to it. Report, then one JSON line last. The snapshot is pickled for
https://pytorch.org/memory_viz ($OUT/train_memory_snapshot.pickle when $OUT is set and it is under --dump-limit-mb).

    PYTHONPATH=$PWD/.gpu-site:$PWD python scripts/gpu_train_memory.py --shape llama-3.2-1b --batch 4 \
        --seq-len 2048 --warmup 2
"""
import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastlm.bench import memory_peak as mp  # noqa: E402
from fastlm.bench import train as bench  # noqa: E402
from fastlm.bench import train_worker as worker  # noqa: E402
from fastlm.bench.batches import make_batch  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(p)  # the bench's own flags and defaults (--steps is unused: one step after the warm-up)
    p.add_argument("--max-entries", type=int, default=200_000, help="allocator history ring buffer entries")
    p.add_argument("--cpp-stacks", action="store_true",
                   help="record C++ frames too (names the autograd node of allocations without Python frames; "
                        "symbolising them can take minutes)")
    p.add_argument("--top", type=int, default=25, help="allocation sites listed at the peak")
    p.add_argument("--events", type=int, default=15, help="events listed up to the peak")
    p.add_argument("--depth", type=int, default=2, help="Python frames in an allocation site")
    p.add_argument("--dump", default=None, help="pickle the snapshot here (default $OUT/ or the temp dir)")
    p.add_argument("--dump-limit-mb", type=float, default=15.0,
                   help="under $OUT, skip the pickle when it is larger than this (the device tool returns <=16 MiB)")
    return p.parse_args()


def start_recording(max_entries: int, cpp: bool) -> str:
    """Turn on the allocator history across torch versions. Returns the call that worked."""
    record = torch.cuda.memory._record_memory_history
    attempts = [
        ("enabled='all', stacks", dict(enabled="all", context="all", stacks="all" if cpp else "python",
                                       max_entries=max_entries)),
        ("enabled='all'", dict(enabled="all", max_entries=max_entries)),
        ("legacy bool", dict(enabled=True, trace_alloc_max_entries=max_entries, trace_alloc_record_context=True)),
    ]
    errors = []
    for name, kwargs in attempts:
        try:
            record(**kwargs)
            return name
        except (TypeError, ValueError, RuntimeError) as exc:
            errors.append(f"{name}: {exc}")
    raise RuntimeError("torch.cuda.memory._record_memory_history refused every form: " + "; ".join(errors))


def stop_recording() -> None:
    try:
        torch.cuda.memory._record_memory_history(enabled=None)
    except TypeError:
        torch.cuda.memory._record_memory_history(False)


def marker(step: int, phase: str) -> None:
    """An allocation of a size no tensor asks for, so the history shows where `phase` of `step` begins/ends."""
    torch.empty(mp.marker_size(step, phase), dtype=torch.uint8, device="cuda")


def labels_for(model) -> dict:
    """Block address -> a name, for blocks allocated before recording began (the loaded weights)."""
    named = list(model.named_parameters()) + [("buffer " + n, b) for n, b in model.named_buffers()]
    return mp.parameter_labels(named)


def dump(snapshot, args) -> dict:
    out = os.environ.get("OUT")
    path = Path(args.dump) if args.dump else Path(out or tempfile.gettempdir()) / "train_memory_snapshot.pickle"
    data = pickle.dumps(snapshot)
    info = {"path": str(path), "mb": round(len(data) / 2 ** 20, 1)}
    if out and not args.dump and len(data) > args.dump_limit_mb * 2 ** 20:
        path = Path(tempfile.gettempdir()) / path.name  # too big to come back from $OUT: keep it on the machine
        info["path"] = str(path)
        info["note"] = f"over --dump-limit-mb {args.dump_limit_mb:g}, not written under $OUT"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return info


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: run it on the GPU machine", file=sys.stderr)
        return 2
    bench.check_args(args)
    t_all = time.perf_counter()
    model_dir, temporary, build = bench.prepare_model(args)  # the bench's build worker, in its own process
    try:
        return run(args, model_dir, build, t_all)
    finally:
        if temporary:
            shutil.rmtree(model_dir, ignore_errors=True)


def run(args, model_dir: Path, build: dict, t_all: float) -> int:
    rec = record_steps(args, model_dir)
    report(args, rec, t_all)
    return 0


def record_steps(args, model_dir: Path) -> dict:
    """Load as the bench's fastlm worker does, then train warm-up + 1 steps with the allocator history on."""
    device, dtype = worker.device_and_dtype()
    autocast = device == "cuda"
    layout = worker.batch_layout("fastlm", args.padding_free)
    model = worker.load_fastlm(model_dir, args.bits, args.rank, args.seed, dtype, args.seq_len, args.offload_embedding)
    torch.cuda.synchronize()
    load_peak = torch.cuda.max_memory_allocated()
    vocab = model.get_input_embeddings().weight.shape[0]
    optimizer, _ = worker.make_optimizer(model, args.lr)
    labels = labels_for(model)
    dev = torch.cuda.current_device()
    how = start_recording(args.max_entries, args.cpp_stacks)
    steps = list(range(args.warmup + 1))
    befores, stats, losses = {}, {}, []
    t_steps = time.perf_counter()
    for step in steps:
        data = make_batch(args.seed, step, args.batch, args.seq_len, vocab, layout)
        inputs = worker.device_inputs(data, device)
        torch.cuda.synchronize()
        process_peak_so_far = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start_allocated = torch.cuda.memory_allocated()
        befores[step] = torch.cuda.memory._snapshot()
        marker(step, "start")
        losses.append(worker.train_step(model, optimizer, inputs, dtype, autocast,
                                        mark=lambda phase, s=step: marker(s, phase)))
        torch.cuda.synchronize()
        stats[step] = {"max_allocated": torch.cuda.max_memory_allocated(), "allocated_at_start": start_allocated,
                       "process_peak_before": process_peak_so_far}
    steps_s = time.perf_counter() - t_steps
    snapshot = torch.cuda.memory._snapshot()
    stop_recording()
    process_peak = max([load_peak] + [max(s["max_allocated"], s["process_peak_before"]) for s in stats.values()])
    return dict(layout=layout, load_peak=load_peak, process_peak=process_peak, labels=labels, dev=dev, how=how,
                steps=steps, befores=befores, stats=stats, losses=losses, steps_s=steps_s, snapshot=snapshot)


def report(args, rec: dict, t_all: float) -> None:
    """Analyse every recorded step; print the report and the JSON line; under $OUT also the full report files."""
    layout, load_peak, process_peak, steps, stats = (rec[k] for k in ("layout", "load_peak", "process_peak",
                                                                      "steps", "stats"))
    losses, how, steps_s, snapshot = rec["losses"], rec["how"], rec["steps_s"], rec["snapshot"]
    trace = mp.device_trace(snapshot, rec["dev"])
    results, problems = {}, {}
    for step in steps:
        try:
            results[step] = mp.analyse_step(rec["befores"][step], trace, step, device=rec["dev"],
                                            labels=rec["labels"], top=args.top, events_before=args.events,
                                            depth=args.depth)
        except ValueError as exc:
            problems[step] = str(exc)
    dumped = dump(snapshot, args)

    gb = 2 ** 30
    rows = [f"fastlm training memory: {args.shape}, {args.bits}-bit, LoRA r{args.rank}, batch {args.batch} x "
            f"{args.seq_len} ({layout}), {torch.cuda.get_device_name()}, torch {torch.__version__}, history: {how}",
            f"load peak {load_peak / gb:.4f} GiB; process peak {process_peak / gb:.4f} GiB (the bench's peak_gb); "
            f"{len(trace)} history entries; steps took {steps_s:.1f} s; losses "
            + ", ".join(f"{x:.4f}" for x in losses),
            f"{'step':>4} {'at start GiB':>12} {'max_allocated GiB':>17} {'replayed GiB':>12} {'slack MB':>8}  phase"]
    for step in steps:
        s, r = stats[step], results.get(step)
        replayed = f"{r.peak / gb:12.4f}" if r else f"{'-':>12}"
        slack = f"{(s['max_allocated'] - r.peak) / 2 ** 20:8.1f}" if r else f"{'-':>8}"
        rows.append(f"{step:4d} {s['allocated_at_start'] / gb:12.4f} {s['max_allocated'] / gb:17.4f} {replayed} "
                    f"{slack}  {r.phase if r else problems.get(step, '')}")
    rows.append("(replayed: the live blocks' sizes, requests rounded up to 512 B; slack: max_allocated minus that, "
                "i.e. blocks handed out whole, larger than asked)")
    header = "\n".join(rows)
    worst = max(steps, key=lambda k: stats[k]["max_allocated"])
    shown = [worst] + ([steps[-1]] if steps[-1] != worst else [])
    report = [header]
    for step in shown:
        if step in results:  # the peak step in full, the last step shorter (the output tail is ~12k characters)
            full = step == worst
            report.append(mp.format_step(results[step], top=None if full else 10, events=None if full else 8))
    report.append(f"snapshot: {dumped['path']} ({dumped['mb']} MB{'; ' + dumped['note'] if 'note' in dumped else ''})"
                  f"; whole run {time.perf_counter() - t_all:.0f} s")
    text = "\n\n".join(report)
    print(text)
    full_json = {"bench": "train_memory", "shape": args.shape, "bits": args.bits, "batch": args.batch,
                 "seq_len": args.seq_len, "rank": args.rank, "layout": layout, "device": torch.cuda.get_device_name(),
                 "torch": torch.__version__, "load_peak_gb": round(load_peak / gb, 4),
                 "process_peak_gb": round(process_peak / gb, 4), "peak_step": worst,
                 "steps": [{"step": k, "max_allocated_gb": round(stats[k]["max_allocated"] / gb, 4),
                            "allocated_at_start_gb": round(stats[k]["allocated_at_start"] / gb, 4),
                            **({"replayed_peak_gb": round(results[k].peak / gb, 4), "phase": results[k].phase}
                               if k in results else {"error": problems.get(k)})} for k in steps],
                 "peaks": {str(k): results[k].as_dict() for k in steps if k in results},
                 "snapshot": dumped, "losses": [round(x, 5) for x in losses]}
    out = os.environ.get("OUT")
    if out:
        Path(out, "train_memory_report.json").write_text(json.dumps(full_json, indent=1))
        Path(out, "train_memory_report.txt").write_text(text + "\n")
    line = {k: v for k, v in full_json.items() if k != "peaks"}
    if worst in results:  # the JSON line: the peak step's 10 largest sites, no events
        top = results[worst].as_dict()
        line["peak"] = {k: v for k, v in top.items() if k not in ("top", "around_peak")}
        line["peak"]["top"] = [dict(g, where=g["where"][:120]) for g in top["top"][:10]]
    print(json.dumps(line))


if __name__ == "__main__":
    sys.exit(main())
