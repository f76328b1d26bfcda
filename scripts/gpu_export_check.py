"""GPU re-check of the exports at a real shape: random-weight model (bf16 on disk) loaded in bf16 and in 4-bit on
CUDA, LoRA with non-zero B, then merged_16bit / merged_4bit / lora exports (each reloads and compares logits with the
adapter model) and, when torchao is installed, the CUDA int4 torchao export. Prints one JSON line per export and a
table last. Run on the GPU machine as:

    PYTHONPATH=.gpu-site:. python scripts/gpu_export_check.py [--shape qwen3-0.6b] [--precisions bf16,4bit]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import PRECISIONS, SHAPES, build_model  # noqa: E402


def run(path: Path, precision: str, out: Path) -> list[dict]:
    from fastlm import FastLanguageModel
    from fastlm.export.methods import attach_export_methods
    from fastlm.utils.imports import is_available

    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=512, **PRECISIONS[precision])
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    attach_export_methods(model)
    jobs = [("merged_16bit", lambda d: model.save_pretrained_merged(d, tok, save_method="merged_16bit")),
            ("merged_4bit", lambda d: model.save_pretrained_merged(d, tok, save_method="merged_4bit")),
            ("lora", lambda d: model.save_pretrained_merged(d, tok, save_method="lora"))]
    if is_available("torchao"):
        jobs.append(("torchao_int4", lambda d: model.save_pretrained_torchao(d, tok, torchao_config="int4")))
    rows = []
    for name, job in jobs:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            report = job(out / f"{precision}-{name}")
            check = report["checks"][-1]
            row = dict(precision=precision, export=name, passed=check["passed"], tier=check["tier"],
                       mean_kl=check["metrics"]["mean_kl"], top1=check["metrics"]["top1_agreement"],
                       max_abs=check["metrics"]["max_abs_logit_diff"])
        except Exception as exc:  # noqa: BLE001 - report and go on with the other exports
            row = dict(precision=precision, export=name, passed=False, error=f"{type(exc).__name__}: {exc}"[:300])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--precisions", default="bf16,4bit")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.shape, Path(tmp) / "model")
        rows = []
        for precision in args.precisions.split(","):
            rows += run(path, precision, Path(tmp) / "out")
    print(f"\n{'precision':9} {'export':13} {'ok':5} {'mean KL':>9} {'top-1':>6} {'max|d|':>8} {'s':>6} {'GB':>5}")
    for r in rows:
        print(f"{r['precision']:9} {r['export']:13} {str(r['passed']):5} {r.get('mean_kl', float('nan')):9.2e} "
              f"{r.get('top1', 0):6.1%} {r.get('max_abs', float('nan')):8.3g} {r['seconds']:6.1f} {r['peak_gpu_gb']:5.2f}")
    ok = all(r["passed"] for r in rows)
    print(json.dumps({"gpu_export_check": "pass" if ok else "fail", "shape": args.shape, "runs": len(rows)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
