"""GPU check of GRPO-style generation on the engine (fastlm/inference/train_generate.py), bf16, real-size shapes.

What TRL's GRPOTrainer does without vLLM is `model.generate(...)` on the model it trains, in train mode; on a
fastlm model that call runs on the engine. Per case (LoRA on a Llama-3.2-1B shape, full fine-tuning on a
Qwen3-0.6B shape; random weights, no download, no TRL needed):

1. stale weights: one AdamW step, then greedy through the training-time generate (train mode, CUDA graphs) against
   transformers' generate in eval mode on the updated weights ("fresh") and on a copy of the weights from before
   the step ("stale"). A current engine agrees with fresh (first token of every row, mean common prefix); the step
   must change HF's own first tokens for the check to mean anything (reported as `step_changed`).
2. speed: a GRPO-like sampled batch (temperature 1, top_k off) through the hook (first call, which includes the
   engine build and CUDA-graph capture, reported on its own; then a warm call) against transformers' generate in
   train mode (TRL's own path); tokens/s = batch x new tokens / seconds.

    python scripts/gpu_grpo_generation_check.py                      # defaults: batch 8, prompt 64, 256 new
    python scripts/gpu_grpo_generation_check.py --device cpu --cases tiny-lora tiny-full --new-tokens 8  # smoke

Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastlm.bench.generate import build_model  # noqa: E402
from fastlm.inference.train_generate import (install_training_generate, remove_training_generate,  # noqa: E402
                                             training_engine)

CASES = {  # name: (shape, LoRA rank or 0 for full fine-tuning, AdamW learning rate)
    "llama-1b-lora": ("llama-3.2-1b", 16, 1e-2),
    "qwen3-0.6b-full": ("qwen3-0.6b", 0, 1e-3),
    "tiny-lora": ("tiny-llama", 8, 1e-2),
    "tiny-full": ("tiny-llama", 0, 1e-2),
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _prepare(shape, rank, dtype, device):
    model = build_model(shape, dtype, device, lora_rank=rank)
    for name, p in model.named_parameters():
        p.requires_grad_(rank == 0 or "lora_" in name)
    model.train()
    install_training_generate(model)
    return model


def _step(model, vocab, device, lr, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(1, vocab, (4, 64), generator=g).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del opt


def _hf_eval(model, ids, new):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              do_sample=False)[:, ids.shape[1]:]
    finally:
        for m, t in flags:
            m.training = t


def _prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_case(name, args, dtype):
    shape, rank, lr = CASES[name]
    device = args.device
    row = {"case": name}
    model = _prepare(shape, rank, dtype, device)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1, vocab, (args.batch, 16), generator=g).to(device)
    stale_model = copy.deepcopy(model)
    _step(model, vocab, device, lr)
    ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                          do_sample=False)[:, ids.shape[1]:].tolist()
    fresh = _hf_eval(model, ids, 16).tolist()
    remove_training_generate(stale_model)
    stale = _hf_eval(stale_model, ids, 16).tolist()
    del stale_model
    b = len(ours)
    row["step_changed"] = sum(f[0] != s[0] for f, s in zip(fresh, stale))
    row["first_fresh"] = sum(o[0] == f[0] for o, f in zip(ours, fresh))
    row["first_stale"] = sum(o[0] == s[0] for o, s in zip(ours, stale))
    row["prefix_fresh"] = sum(_prefix(o, f) for o, f in zip(ours, fresh)) / b
    state = training_engine(model)
    engine = state.engine if state is not None else None
    row["fused"] = bool(getattr(getattr(engine, "view", None), "fused", False))
    try:
        row["kv_cache_mb"] = round(sum(t.numel() * t.element_size() for t in engine.cache.k + engine.cache.v) / 2**20)
    except Exception:  # noqa: BLE001 - internal layout; informative only
        row["kv_cache_mb"] = None
    row["weights_ok"] = row["first_fresh"] >= b - 1 and row["step_changed"] > 0 and row["first_fresh"] > row["first_stale"]

    # speed: a sampled GRPO batch
    prompt = torch.randint(1, vocab, (args.batch, args.prompt), generator=g).to(device)
    kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
              do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=args.new_tokens)
    state.engine = None  # time a cold start at this batch size: build + capture
    for label in ("hook_first_s", "hook_s"):
        _sync(device)
        t0 = time.perf_counter()
        model.generate(**kw)
        _sync(device)
        row[label] = round(time.perf_counter() - t0, 3)
    remove_training_generate(model)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(**kw)  # train mode, no hook: TRL's own path
    _sync(device)
    row["hf_train_s"] = round(time.perf_counter() - t0, 3)
    tokens = args.batch * args.new_tokens
    row["hook_tok_s"] = round(tokens / row["hook_s"], 1)
    row["hf_tok_s"] = round(tokens / row["hf_train_s"], 1)
    row["speedup"] = round(row["hf_train_s"] / row["hook_s"], 2)
    if device == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["llama-1b-lora", "qwen3-0.6b-full"], choices=list(CASES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for name in args.cases:
        try:
            rows.append(check_case(name, args, dtype))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next case
            traceback.print_exc()
            rows.append({"case": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    cols = ["case", "weights_ok", "step_changed", "first_fresh", "first_stale", "prefix_fresh", "fused",
            "kv_cache_mb", "hook_first_s", "hook_s", "hf_train_s", "hook_tok_s", "hf_tok_s", "speedup", "error"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    result = {"check": "grpo_generation", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "ok": all(r.get("weights_ok") for r in rows), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
