"""GPU diagnostic: prefills of several prompts and decode buckets of several rows against one-prompt runs, row by row.

Five prompts (5, 31, 12, 20, 7 tokens) are each prefilled alone in slot 0 and decoded one step; then the first 2, 3
and 5 are prefilled together and decoded one step in their bucket (2, 4, 8) on the alone runs' tokens. Prints the
largest logit difference of each row, for the default engine (captured prefill and decode) and with graphs,
compilation and fusion switched off in turn: a row far above bf16 rounding (~0.1 on this random-weight model)
points at the path that differs. Random-weight Llama-3.2-1B shape with LoRA r16.

    python scripts/gpu_multirow_diag.py
"""
import sys
import traceback

import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastlm.bench.generate import build_model
from fastlm.inference.engine import Engine

model = build_model("llama-3.2-1b", torch.bfloat16, "cuda", lora_rank=16)
vocab = 128256
g = torch.Generator().manual_seed(2)
prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 31, 12, 20, 7)]

def run(name, **kw):
    try:
        eng = Engine(model, max_slots=8, max_len=200, **kw)
        alone, step1 = [], []
        for p in prompts:
            lg = eng.prefill([0], [p]).clone(); alone.append(lg[0])
            tok = lg.argmax(-1)
            step1.append(eng.decode(tok, torch.tensor([len(p)], device="cuda"))[0].clone())
        alone = torch.stack(alone); step1 = torch.stack(step1)
        for n in (2, 3, 5):
            t = eng.prefill(list(range(n)), prompts[:n]).clone()
            d = (t - alone[:n]).abs().amax(-1).tolist()
            b = eng.bucket(n)
            tok = torch.tensor([int(alone[i].argmax()) for i in range(n)] + [0] * (b - n), device="cuda")
            pos = torch.tensor([len(p) for p in prompts[:n]] + [0] * (b - n), device="cuda")
            out = eng.decode(tok, pos)[:n].clone()
            dd = (out - step1[:n]).abs().amax(-1).tolist()
            print(f"{name:28s} n={n} prefill rowdiff {[round(x,3) for x in d]}  decode(b{b}) rowdiff {[round(x,3) for x in dd]}", flush=True)
    except Exception:
        traceback.print_exc()

run("default")
run("no graphs", cuda_graphs=False)
run("no graphs no compile", cuda_graphs=False, compile=False)
run("no fuse no graphs", cuda_graphs=False, compile=False, fuse=False)
