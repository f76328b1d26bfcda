"""`fastlm bench train` / `python -m fastlm.bench.train`: plain HF+PEFT against fastlm, LoRA training, one command.

Builds a seeded random-weight model of a named real shape once (fastlm/bench/shapes.py), then trains each side in its
own process on identical seeded batches (same LoRA init, AdamW, lr) and prints a table and, last, one JSON line:
tokens/s, peak memory (over the whole training, weights included), the fastlm/hf ratios of both, and both sides'
losses, which must agree (relative difference of the mean of the last k steps). A side that runs out of memory is
reported as "OOM". `--max-context` instead finds, by bisection over fresh processes, the longest sequence that
completes one training step at batch 1.

    fastlm bench train --shape llama-3.2-1b --batch 4 --seq-len 2048 --steps 10
    fastlm bench train --shape llama-3.1-8b --bits 4 --padding-free
    fastlm bench train --shape llama-3.2-1b --max-context --sides fastlm,hf
    fastlm bench train --shape tiny-llama --batch 2 --seq-len 64 --steps 3     # CPU smoke run

Exit status: 0 done (OOM is a result, not a failure), 1 a side failed for another reason, 3 the losses disagree.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .shapes import SHAPES

SIDES = ("hf", "fastlm")
EXIT_SIDE_FAILED, EXIT_LOSS_MISMATCH = 1, 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama-3.2-1b", help=f"model shape: {', '.join(SHAPES)} (default llama-3.2-1b)")
    p.add_argument("--bits", type=int, default=16, help="16 (bf16 weights) or 4 (bitsandbytes NF4, QLoRA)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (the longest with --padding-free)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = r) on all 7 linear layers")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=3407, help="seed of the weights, LoRA init and data")
    p.add_argument("--offload-embedding", action="store_true",
                   help="fastlm side: from_pretrained(offload_embedding=True), the input embedding in CPU memory "
                        "(models with untied embeddings)")
    p.add_argument("--tiled-mlp", action="store_true",
                   help="fastlm side: from_pretrained(unsloth_tiled_mlp=True), the MLP computed in sequence tiles "
                        "(long contexts)")
    p.add_argument("--padding-free", action="store_true",
                   help="variable lengths in [64, seq-len]: fastlm trains them packed (position_ids per sequence), "
                        "HF the same sequences padded; tokens/s counts real tokens")
    p.add_argument("--sides", default=None,
                   help="comma list of hf,fastlm (default both; with --max-context only fastlm)")
    p.add_argument("--loss-rtol", type=float, default=0.01,
                   help="largest allowed relative difference of the sides' mean loss over the last k steps")
    p.add_argument("--loss-last-k", type=int, default=5, help="k of --loss-rtol (default 5)")
    p.add_argument("--max-context", action="store_true",
                   help="find the longest sequence that trains one step at batch 1 (bisection, a process per probe)")
    p.add_argument("--context-start", type=int, default=None, help="first probe length (default --seq-len)")
    p.add_argument("--context-step", type=int, default=1024, help="bisection resolution in tokens (default 1024)")
    p.add_argument("--context-limit", type=int, default=None,
                   help="longest length tried (default the shape's max_position_embeddings)")
    p.add_argument("--model-dir", default=None,
                   help="keep the random model here and reuse it on later runs (default: a temporary directory, "
                        "in /dev/shm when it has room, removed afterwards)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one process may run (default 3600)")
    p.add_argument("--record", default=None, metavar="MARKDOWN",
                   help="append the result to this file (e.g. docs/benchmarks.md) with date, device and versions")
    p.add_argument("--verbose", action="store_true", help="show the worker processes' output")
    # the worker processes' own arguments (internal)
    p.add_argument("--worker", choices=("build",) + SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)


def check_args(args) -> list[str]:
    """Validate everything at once. Returns the sides to run."""
    from ..errors import ProblemList

    p = ProblemList("fastlm bench train")
    if args.shape not in SHAPES:
        p.add("--shape", args.shape, f"one of {', '.join(SHAPES)}", "pick a listed shape")
    if args.bits not in (16, 4):
        p.add("--bits", args.bits, "16 or 4", "use --bits 16 (bf16) or --bits 4 (NF4)")
    for name in ("batch", "seq_len", "rank", "steps", "context_step", "loss_last_k"):
        value = getattr(args, name)
        if not isinstance(value, int) or value <= 0:
            p.add("--" + name.replace("_", "-"), value, "a positive integer", "e.g. the default")
    if args.warmup < 0:
        p.add("--warmup", args.warmup, "zero or more steps", "e.g. --warmup 2")
    if args.lr <= 0 or args.loss_rtol <= 0 or args.timeout <= 0:
        bad = [n for n in ("lr", "loss_rtol", "timeout") if getattr(args, n) <= 0]
        for n in bad:
            p.add("--" + n.replace("_", "-"), getattr(args, n), "a positive number", "use the default")
    for name in ("context_start", "context_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.add("--" + name.replace("_", "-"), value, "a positive integer", "leave it out for the default")
    sides = [s.strip() for s in (args.sides or ("fastlm" if args.max_context else ",".join(SIDES))).split(",")]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides or len(set(sides)) != len(sides):
        p.add("--sides", args.sides, "a comma list of hf and fastlm, each once", "e.g. --sides hf,fastlm")
    if args.padding_free and args.max_context:
        p.add("--padding-free", True, "--max-context probes one dense sequence at batch 1", "drop one of them")
    if args.offload_embedding and (_ties(args.shape) or not _cuda()):
        p.add("--offload-embedding", True, "a CUDA device and a shape with untied embeddings (e.g. llama-3.1-8b)",
              "drop --offload-embedding")
    p.raise_if_any()
    return sides


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ties(shape: str) -> bool:
    return bool(SHAPES.get(shape, {}).get("tie_word_embeddings", False))


# --------------------------------------------------------------------------- worker processes

def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the fastlm package
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(kind: str, args, model_dir: Path, **overrides) -> dict:
    """Run `--worker kind` in a fresh process and return its record; a crash becomes an error/OOM record."""
    values = {k: getattr(args, k) for k in ("shape", "bits", "batch", "seq_len", "rank", "steps", "warmup", "lr",
                                            "seed", "padding_free", "offload_embedding", "tiled_mlp")}
    values.update(overrides)
    with tempfile.TemporaryDirectory(prefix="fastlm-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "fastlm.bench.train", "--worker", kind, "--result", str(result),
               "--model-dir", str(model_dir)]
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                cmd += [flag] if value else []
            else:
                cmd += [flag, str(value)]
        log = Path(tmp) / "log.txt"
        try:
            with open(log, "w") as fh:  # --verbose: the worker's output goes to our stderr, stdout stays clean
                proc = subprocess.run(cmd, env=_child_env(), stdout=sys.stderr if args.verbose else fh,
                                      stderr=subprocess.STDOUT, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            return {"side": kind, "status": "timeout", "error": f"no result within --timeout {args.timeout:g} s"}
        if result.is_file():
            return json.loads(result.read_text())
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.is_file() else ""
        status = "OOM" if code in (-9, 137) else "error"
        why = "killed (SIGKILL: most likely out of host memory)" if status == "OOM" else f"exit status {code}"
        return {"side": kind, "status": status, "error": f"the {kind} process ended without a result: {why}\n{tail}"}


def _approx_parameters(shape: str) -> int:
    kw = SHAPES[shape]
    h, inter, layers, vocab = kw["hidden_size"], kw["intermediate_size"], kw["num_hidden_layers"], kw["vocab_size"]
    head_dim = kw.get("head_dim", h // kw["num_attention_heads"])
    attn = h * head_dim * (2 * kw["num_attention_heads"] + 2 * kw["num_key_value_heads"])
    return vocab * h * (1 if kw.get("tie_word_embeddings") else 2) + layers * (attn + 3 * h * inter)


def _model_parent_dir(shape: str) -> str:
    """/dev/shm when it holds the saved model (bf16 with a GPU, fp32 without) with room to spare, else the usual
    temporary directory. Checking for a GPU does not create a CUDA context in this process."""
    import torch

    needed = _approx_parameters(shape) * (2 if torch.cuda.is_available() else 4) + 2 ** 30
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.25 * needed:
        return str(shm)
    return tempfile.gettempdir()


def prepare_model(args) -> tuple[Path, bool, dict]:
    """The model directory (built now unless --model-dir already holds this shape and seed), whether it is
    temporary, and its build record."""
    from ..errors import FastLMError
    from .train_worker import BUILD_MARKER

    if args.model_dir:
        model_dir, temporary = Path(args.model_dir).expanduser().resolve(), False
        marker = model_dir / BUILD_MARKER
        if marker.is_file():
            record = json.loads(marker.read_text())
            if record.get("shape") == args.shape and record.get("seed") == args.seed:
                return model_dir, False, dict(record, reused=True)
        if model_dir.exists() and any(model_dir.iterdir()):
            raise FastLMError(f"--model-dir {str(model_dir)!r} is not empty and holds no benchmark model of shape "
                              f"{args.shape!r} seed {args.seed}. Fix: pass an empty or new directory.")
    else:
        model_dir, temporary = Path(tempfile.mkdtemp(prefix="fastlm-bench-model-", dir=_model_parent_dir(args.shape))), True
    record = run_worker("build", args, model_dir)
    if record.get("status") in ("error", "OOM", "timeout"):
        if temporary:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise FastLMError(f"building the {args.shape} model failed: {record.get('error')}")
    return model_dir, temporary, record


# --------------------------------------------------------------------------- comparison and output

def compare_losses(hf: dict, fast: dict, last_k: int, rtol: float) -> dict:
    """Relative difference of the two sides' mean loss over their last k steps."""
    a, b = hf.get("losses") or [], fast.get("losses") or []
    if hf.get("status") != "ok" or fast.get("status") != "ok" or not a or not b:
        return {"losses_agree": None, "loss_rel_diff": None}
    k = min(last_k, len(a), len(b))
    mean_a, mean_b = sum(a[-k:]) / k, sum(b[-k:]) / k
    rel = abs(mean_a - mean_b) / max(abs(mean_a), 1e-12)
    return {"losses_agree": bool(rel <= rtol), "loss_rel_diff": rel, "loss_last_k": k}


def _side_summary(record: dict, last_k: int) -> dict:
    losses = record.get("losses") or []
    k = min(last_k, len(losses))
    keys = ("status", "tokens_per_s", "peak_gb", "load_peak_gb", "step_ms_median", "step_ms_p20", "step_ms_p80",
            "load_s", "trainable_parameters", "layout", "error")
    out = {key: record.get(key) for key in keys if record.get(key) is not None}
    out["losses"] = [round(x, 6) for x in losses]
    if k:
        out["loss_final"] = round(losses[-1], 6)
        out["loss_last_mean"] = round(sum(losses[-k:]) / k, 6)
    return out


def summarize(args, sides: list[str], results: dict, build: dict) -> dict:
    info = next((r for r in results.values() if r.get("device")), {})
    summary = {"bench": "train", "shape": args.shape, "bits": args.bits, "batch": args.batch, "seq_len": args.seq_len,
               "rank": args.rank, "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "seed": args.seed,
               "padding_free": args.padding_free, "offload_embedding": args.offload_embedding,
               "tiled_mlp": args.tiled_mlp, "device": info.get("device_name"), "dtype": info.get("dtype"),
               "autocast": info.get("autocast"), "memory": info.get("memory"), "versions": info.get("versions"),
               "parameters": build.get("parameters"), "commit": _git_commit()}
    for side in sides:
        summary[side] = _side_summary(results[side], args.loss_last_k)
    if all(s in results for s in SIDES):
        hf, fast = summary["hf"], summary["fastlm"]
        if hf.get("tokens_per_s") and fast.get("tokens_per_s"):
            summary["speed_ratio"] = round(fast["tokens_per_s"] / hf["tokens_per_s"], 3)
        if hf.get("peak_gb") and fast.get("peak_gb") and hf["status"] == fast["status"] == "ok":
            summary["memory_ratio"] = round(fast["peak_gb"] / hf["peak_gb"], 3)
        summary.update(compare_losses(results["hf"], results["fastlm"], args.loss_last_k, args.loss_rtol))
        summary["loss_rtol"] = args.loss_rtol
    return summary


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_table(summary: dict, sides: list[str]) -> str:
    s = summary
    lines = [f"fastlm bench train: {s['shape']}, {s['bits']}-bit, LoRA r{s['rank']} on 7 linears, batch {s['batch']} x "
             f"{s['seq_len']}{' (padding-free, variable lengths)' if s['padding_free'] else ''}"
             f"{', fastlm embedding offloaded to CPU' if s.get('offload_embedding') else ''}"
             f"{', fastlm MLP tiled' if s.get('tiled_mlp') else ''}, {s['steps']} timed "
             f"steps after {s['warmup']} warm-up; {s['device']} ({s['dtype']}{', autocast' if s['autocast'] else ''})",
             f"{'side':<8} {'status':<7} {'tokens/s':>10} {'step ms p20/med/p80':>22} {'peak GB':>8} "
             f"{'loss first -> last-k mean':>26}"]
    for side in sides:
        r = s[side]
        ms = "/".join(_fmt(r.get(k), ".0f") for k in ("step_ms_p20", "step_ms_median", "step_ms_p80"))
        losses = r.get("losses") or []
        loss = f"{losses[0]:.4f} -> {r['loss_last_mean']:.4f}" if losses and "loss_last_mean" in r else "-"
        lines.append(f"{side:<8} {r.get('status', '?'):<7} {_fmt(r.get('tokens_per_s'), ',.0f'):>10} {ms:>22} "
                     f"{_fmt(r.get('peak_gb'), '.2f'):>8} {loss:>26}")
    if "losses_agree" in s:
        ratios = f"fastlm/hf: speed {_fmt(s.get('speed_ratio'), '.2f')}x, peak memory {_fmt(s.get('memory_ratio'), '.2f')}x"
        if s["losses_agree"] is None:
            verdict = "losses not compared (a side did not finish)"
        else:
            verdict = (f"losses {'agree' if s['losses_agree'] else 'DISAGREE'} (relative difference "
                       f"{s['loss_rel_diff']:.2e} {'<=' if s['losses_agree'] else '>'} {s['loss_rtol']:g} over the last "
                       f"{s['loss_last_k']} steps)")
        lines.append(f"{ratios}; {verdict}")
    lines.append(f"peak memory: {s.get('memory')}")
    return "\n".join(lines)


def _command_line() -> str:
    """The command as the user typed it (for the record)."""
    import shlex

    prog = Path(sys.argv[0]).name
    head = ["fastlm"] if prog == "fastlm" else ["python", "-m", "fastlm.bench.train"]
    return shlex.join(head + sys.argv[1:])


def _git_commit() -> str | None:
    try:
        if os.environ.get("FASTLM_COMMIT"):  # a copy of the tree without its git history (a GPU machine)
            return os.environ["FASTLM_COMMIT"]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def append_record(path: str, title: str, body: str) -> None:
    """Append a dated section to a markdown file (written to a temporary file, then renamed into place)."""
    target = Path(path)
    old = target.read_text() if target.is_file() else "# Benchmarks\n"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = old.rstrip("\n") + f"\n\n## {stamp}: {title}\n\n{body.rstrip()}\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


def _record_body(summary: dict, table: str, command: str) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in (summary.get("versions") or {}).items())
    return (f"`{command}`\n\n{versions}; fastlm commit {summary.get('commit')}\n\n```\n{table}\n```\n\n"
            f"```json\n{json.dumps(summary)}\n```")


# --------------------------------------------------------------------------- max context

def bisect_max_context(probe, start: int, limit: int, step: int) -> tuple[int, list[tuple[int, bool]]]:
    """The longest length in multiples of `step` (up to `limit`) for which `probe(length)` is True, assuming
    success is monotone: double from `start` until a failure or the limit, then bisect. Returns (length, probes);
    length 0 means even the shortest probe failed."""
    probes: list[tuple[int, bool]] = []

    def check(n: int) -> bool:
        ok = bool(probe(n))
        probes.append((n, ok))
        return ok

    good, bad = 0, None
    n = min(max(step, start), limit)
    while True:
        if check(n):
            good = n
            if n >= limit:
                return good, probes
            n = min(n * 2, limit)
        else:
            bad = n
            break
    low = good if good else 0
    while bad - low > step:
        mid = max(step, ((low + bad) // 2) // step * step)
        if mid <= low or mid >= bad:
            break
        if check(mid):
            low = mid
        else:
            bad = mid
    return low, probes


def run_max_context(args, sides: list[str], model_dir: Path, build: dict) -> int:
    limit = args.context_limit or SHAPES[args.shape].get("max_position_embeddings", 131072)
    start = args.context_start or args.seq_len
    summary = {"bench": "train-max-context", "shape": args.shape, "bits": args.bits, "rank": args.rank, "batch": 1,
               "limit": limit, "resolution": args.context_step, "commit": _git_commit()}
    lines = []
    for side in sides:
        last: dict = {}

        def probe(n: int) -> bool:
            record = run_worker(side, args, model_dir, batch=1, seq_len=n, steps=1, warmup=0, padding_free=False)
            last.update(record)
            print(f"  {side} seq {n}: {record.get('status')}"
                  f"{'' if record.get('status') == 'ok' else ' (' + str(record.get('error', ''))[:120] + ')'}",
                  file=sys.stderr, flush=True)
            return record.get("status") == "ok"

        best, probes = bisect_max_context(probe, start, limit, args.context_step)
        summary.setdefault("device", last.get("device_name"))
        summary.setdefault("versions", last.get("versions"))
        summary[side] = {"max_context": best, "limit_reached": best >= limit,
                         "probes": [[n, "ok" if ok else "fail"] for n, ok in probes]}
        lines.append(f"{side:<8} {best:>10,} {'(the limit)' if best >= limit else '':<12} {len(probes):>7}")
    if all(s in summary for s in SIDES) and summary["hf"]["max_context"]:
        summary["context_ratio"] = round(summary["fastlm"]["max_context"] / summary["hf"]["max_context"], 3)
    table = "\n".join([f"fastlm bench train --max-context: {args.shape}, {args.bits}-bit, LoRA r{args.rank}, batch 1, "
                       f"resolution {args.context_step} tokens; {summary.get('device')}",
                       f"{'side':<8} {'max tokens':>10} {'':<12} {'probes':>7}"] + lines)
    print(table)
    if args.record:
        append_record(args.record, f"max context, {args.shape} {args.bits}-bit",
                      _record_body(summary, table, _command_line()))
    print(json.dumps(summary), flush=True)
    return 0


# --------------------------------------------------------------------------- entry points

def run(args) -> int:
    if args.worker:
        from .train_worker import worker_main

        return worker_main(args)
    sides = check_args(args)
    model_dir, temporary, build = prepare_model(args)
    try:
        if args.max_context:
            return run_max_context(args, sides, model_dir, build)
        results = {}
        for side in sides:
            print(f"fastlm bench train: running the {side} side ...", file=sys.stderr, flush=True)
            results[side] = run_worker(side, args, model_dir)
            if results[side].get("status") not in ("ok", "OOM"):
                print(f"fastlm bench train: the {side} side failed: {results[side].get('error')}", file=sys.stderr)
    finally:
        if temporary:
            shutil.rmtree(model_dir, ignore_errors=True)
    summary = summarize(args, sides, results, build)
    table = format_table(summary, sides)
    print(table)
    if args.record:
        append_record(args.record, f"{args.shape} {args.bits}-bit, batch {args.batch} x {args.seq_len}"
                      f"{', padding-free' if args.padding_free else ''}",
                      _record_body(summary, table, _command_line()))
    print(json.dumps(summary), flush=True)
    if any(results[s].get("status") not in ("ok", "OOM") for s in sides):
        return EXIT_SIDE_FAILED
    if summary.get("losses_agree") is False:
        return EXIT_LOSS_MISMATCH
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastlm.bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import ConfigError, FastLMError

    try:
        return run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FastLMError as exc:
        print(f"fastlm bench train: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
