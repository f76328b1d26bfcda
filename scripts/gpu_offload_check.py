"""GPU check of offloaded gradient checkpointing (fastlm/patch/offload_checkpointing.py) against plain checkpointing.

For each configuration: a seeded random-weight model of a real shape, loaded as plain transformers + PEFT LoRA (r16,
7 linears, non-reentrant checkpointing; QLoRA for 4-bit), trained a few steps with plain checkpointing, then from the
same LoRA weights with the offloaded variant installed. It checks in bf16 at real size that the losses and the first
step's LoRA gradients agree, and measures the peak memory of the training steps (weights included, and above what
was allocated after loading) and the step time (CUDA events, median). Table last, then one JSON line.

    PYTHONPATH=.gpu-site:. python scripts/gpu_offload_check.py                 # llama-3.2-1b 16-bit (+ 8b 4-bit)
    PYTHONPATH=.gpu-site:. python scripts/gpu_offload_check.py --configs llama-3.2-1b:16 --seq-len 8192
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastlm.bench.batches import make_batch  # noqa: E402
from fastlm.bench.train_worker import build_model_dir, load_hf  # noqa: E402
from fastlm.patch.offload_checkpointing import install_offloaded_checkpointing  # noqa: E402


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def train_steps(model, params, steps: int, batch: int, seq_len: int, seed: int, vocab: int) -> dict:
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    losses, times, first_grads = [], [], None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for step in range(steps):
        data = make_batch(seed, step, batch, seq_len, vocab, "dense")
        inputs = {k: v.cuda() for k, v in data.items() if k != "tokens"}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        if first_grads is None:
            first_grads = [p.grad.detach().float().clone() for p in params]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        losses.append(loss.item())
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated()
    return {"losses": losses, "step_ms": statistics.median(times[1:] or times), "peak_gb": peak / 2 ** 30,
            "above_weights_gb": (peak - base) / 2 ** 30, "grads": first_grads}


def check(shape: str, bits: int, batch: int, seq_len: int, steps: int, seed: int, work: Path) -> dict:
    model_dir = work / shape
    if not model_dir.is_dir():
        build_model_dir(shape, model_dir, seed)
        torch.cuda.empty_cache()
    model = load_hf(model_dir, bits, 16, seed, torch.bfloat16, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    vocab = model.get_input_embeddings().weight.shape[0]
    row = {"shape": shape, "bits": bits, "batch": batch, "seq_len": seq_len}
    results = {}
    for mode in ("plain", "offloaded"):
        with torch.no_grad():
            for p, v in zip(params, initial):
                p.copy_(v)
        undo = install_offloaded_checkpointing(model) if mode == "offloaded" else None
        try:
            results[mode] = train_steps(model, params, steps, batch, seq_len, seed, vocab)
        except torch.OutOfMemoryError:
            results[mode] = {"oom": True}
        finally:
            if undo:
                undo()
    plain, off = results["plain"], results["offloaded"]
    if "oom" in plain or "oom" in off:
        row.update(plain_oom="oom" in plain, offloaded_oom="oom" in off)
        return row
    grad_err = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(off["grads"], plain["grads"]))
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(off["losses"], plain["losses"]))
    row.update({f"{mode}_{key}": round(results[mode][key], 3) for mode in results
                for key in ("step_ms", "peak_gb", "above_weights_gb")})
    row.update(loss_max_rel_diff=loss_err, grad_max_rel_diff=grad_err, ok=bool(loss_err < 1e-2 and grad_err < 5e-2),
               losses_plain=[round(x, 4) for x in plain["losses"]], losses_offloaded=[round(x, 4) for x in off["losses"]])
    del model
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help="comma list of SHAPE:BITS (default llama-3.2-1b:16, plus "
                                                        "llama-3.1-8b:4 when bitsandbytes is importable)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=3407)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_offload_check: needs a CUDA GPU", file=sys.stderr)
        return 1
    configs = args.configs or ("llama-3.2-1b:16" + (",llama-3.1-8b:4" if _has_bitsandbytes() else ""))
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="fastlm-offload-", dir=str(shm) if shm.is_dir() else None))
    rows = []
    try:
        for item in configs.split(","):
            shape, bits = item.split(":")
            rows.append(check(shape, int(bits), args.batch, args.seq_len, args.steps, args.seed, work))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch} x {args.seq_len}, "
          f"LoRA r16, {args.steps} steps (time: median after the first); peak = max_memory_allocated of the steps")
    print(f"{'shape':<14} {'bits':>4} {'plain ms':>9} {'offl. ms':>9} {'plain GB':>9} {'offl. GB':>9} "
          f"{'saved GB':>9} {'loss rel':>9} {'grad rel':>9} ok")
    for r in rows:
        if "plain_step_ms" not in r:
            print(f"{r['shape']:<14} {r['bits']:>4} OOM: plain={r.get('plain_oom')} offloaded={r.get('offloaded_oom')}")
            continue
        print(f"{r['shape']:<14} {r['bits']:>4} {r['plain_step_ms']:>9.1f} {r['offloaded_step_ms']:>9.1f} "
              f"{r['plain_peak_gb']:>9.2f} {r['offloaded_peak_gb']:>9.2f} "
              f"{r['plain_peak_gb'] - r['offloaded_peak_gb']:>9.2f} {r['loss_max_rel_diff']:>9.1e} "
              f"{r['grad_max_rel_diff']:>9.1e} {r['ok']}")
    print(json.dumps({"check": "offload_checkpointing", "device": torch.cuda.get_device_name(), "rows": rows}))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
