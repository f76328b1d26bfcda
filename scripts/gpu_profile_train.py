"""Where a fastlm LoRA training step spends its GPU time (H100 tuning aid, not a benchmark).

Builds the random Llama-3.2-1B-shape model in memory, loads it through FastLanguageModel + get_peft_model, and for
each checkpointing mode (unsloth / True / False) times a few steps (median ms, peak GB); then profiles one step of
the first mode and prints the top CUDA kernels by total time. Table last, one JSON line after it.

    PYTHONPATH=.gpu-site:. python scripts/gpu_profile_train.py [--modes unsloth,true,false] [--batch 4 --seq 2048]
"""
import argparse
import json
import statistics
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--modes", default="unsloth,true,false")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from fastlm.bench.train_worker import build_model_dir
    from fastlm import FastLanguageModel, patch

    tmp = tempfile.mkdtemp(dir="/dev/shm")
    build_model_dir(args.shape, __import__("pathlib").Path(tmp) / "m", 0)
    rows = []
    prof_table = None
    for mode in args.modes.split(","):
        gc = {"unsloth": "unsloth", "true": True, "false": False}[mode]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, _ = FastLanguageModel.from_pretrained(f"{tmp}/m", load_in_16bit=True, dtype=torch.bfloat16,
                                                     max_seq_length=args.seq)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=gc)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(4, 128000, (args.batch, args.seq), device="cuda")

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = []
        for i in range(args.steps + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t) * 1000)
        ms = statistics.median(times)
        rows.append(dict(mode=mode, ms=round(ms, 1), tok_s=round(args.batch * args.seq / ms * 1000),
                         peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                         patches=patch.patch_set(model).names))
        if prof_table is None:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            prof_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60)
        del model, opt
    print(prof_table)
    print(f"{'mode':8} {'ms':>8} {'tok/s':>8} {'peak GB':>8}  patches")
    for r in rows:
        print(f"{r['mode']:8} {r['ms']:8.1f} {r['tok_s']:8d} {r['peak_gb']:8.2f}  {','.join(r['patches'])}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
