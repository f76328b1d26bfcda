"""GPU check of the fused LoRA functions against PEFT at Llama-3.2-1B sizes, bf16 and NF4 bases.

For each base precision (bf16; NF4 with double quantization through bitsandbytes) and each part (the MLP with
LoRA on gate/up/down, q/k/v, o): random weights, LoRA r=16 on every projection (adapters in fp32, as PEFT
autocasts them; B non-zero), 8192 tokens. It compares the fused functions' output and gradients (x, every A and B)
with PEFT's layers (max error relative to the largest magnitude), times forward+backward of both with
triton.testing.do_bench (median, p20, p80 in ms) and measures the peak memory each adds over its inputs. It also
checks the Triton NF4 dequantization bit-exact against bitsandbytes on CUDA and times both. Last, whole-model
training steps (Llama-3.2-1B shape, random weights, LoRA r=16 on all 7 linears, batch 4 x 2048, gradient
checkpointing) through FastLanguageModel with PEFT's forwards and with install_fast_lora: tokens/s, peak memory.
Prints a table, then one JSON line last. Run on the GPU machine from the repository root:

    PYTHONPATH=.gpu-site:. python scripts/gpu_lora_check.py [--tokens 8192] [--hidden 2048] [--inter 8192]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from fastlm.kernels.lora import fused_lora_linear, fused_lora_mlp, fused_lora_qkv
from fastlm.kernels.nf4_dequant import nf4_dequantize_triton
from fastlm.patch.fast_lora import lora_parts

DEVICE = "cuda"
TOL_BF16 = 3e-2  # bf16 outputs and gradients: a few bf16 roundings of the LoRA terms apart from PEFT's fp32 branch


class Block(nn.Module):
    def __init__(self, hidden, inter, kv):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=32))


def build(precision: str, hidden: int, inter: int, kv: int, r: int):
    import peft

    torch.manual_seed(0)
    block = Block(hidden, inter, kv)
    for m in block.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=hidden ** -0.5)
    if precision == "nf4":
        import bitsandbytes as bnb

        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True, blocksize=64)
                    setattr(parent, name, q.to(DEVICE))
        block.is_loaded_in_4bit = True
    block = block.to(device=DEVICE, dtype=torch.bfloat16) if precision == "bf16" else block.to(DEVICE)
    config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    model = peft.get_peft_model(block, config).base_model.model
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_" in n:
            assert p.dtype == torch.float32, (n, p.dtype)
    return model


def parts_of(layers):
    parts = [lora_parts(m) for m in layers]
    bad = [p for p in parts if isinstance(p, str)]
    if bad:
        raise RuntimeError(f"fusion does not apply: {bad}")
    return parts


def cases(model):
    mlp = model.mlp
    mlp_layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    mp = parts_of(mlp_layers)
    qkv_layers = (model.q_proj, model.k_proj, model.v_proj)
    qp = parts_of(qkv_layers)
    op = parts_of((model.o_proj,))[0]
    return {
        "mlp": (mlp_layers, mlp, lambda x: fused_lora_mlp(x, *(p[0] for p in mp), tuple(p[1] for p in mp), "silu")),
        "qkv": (qkv_layers, lambda x: tuple(m(x) for m in qkv_layers),
                lambda x: fused_lora_qkv(x, [p[0] for p in qp], [p[1] for p in qp])),
        "o": ((model.o_proj,), model.o_proj, lambda x: fused_lora_linear(x, *op)),
    }


def fwd_bwd(fn, x, grads):
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads)
    return outs


def compare(layers, peft_fn, fused_fn, x):
    """Max error of the fused outputs and gradients (x, every A and B) relative to PEFT's largest magnitude."""
    params = [t for m in layers for t in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    with torch.no_grad():
        outs = peft_fn(x)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    grads_out = [torch.randn(o.shape, device=DEVICE, generator=gen).to(o.dtype)
                 for o in (outs if isinstance(outs, tuple) else (outs,))]
    results = []
    for fn in (peft_fn, fused_fn):
        for t in (x, *params):
            t.grad = None
        outs = fwd_bwd(fn, x, grads_out)
        results.append([o.detach().float() for o in outs] + [t.grad.float() for t in (x, *params)])
    err = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() for a, b in zip(results[1], results[0]))
    return err, grads_out, params


def measure(fn, x, grads_out, params):
    from triton.testing import do_bench

    def step():
        fwd_bwd(fn, x, grads_out)

    for t in (x, *params):
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, grad_to_none=[x, *params], quantiles=[0.5, 0.2, 0.8])
    return ms, peak / 2 ** 20


def check_dequant(model):
    import bitsandbytes.functional as bnbf
    from triton.testing import do_bench

    w = model.mlp.down_proj.base_layer.weight
    state = w.quant_state
    want = bnbf.dequantize_4bit(w, state)
    got = nf4_dequantize_triton(w, state)
    exact = bool(torch.equal(got, want))
    t_ours = do_bench(lambda: nf4_dequantize_triton(w, state))
    t_bnb = do_bench(lambda: bnbf.dequantize_4bit(w, state))
    return {"shape": list(state.shape), "bit_exact": exact, "triton_ms": round(t_ours, 4), "bnb_ms": round(t_bnb, 4)}


def train_steps(precision: str, shape: str, batch: int, seq: int, steps: int = 5) -> dict:
    """Whole-model LoRA r=16 training steps (gradient checkpointing) through FastLanguageModel, plain PEFT
    forwards vs install_fast_lora on the same instance: tokens/s and peak memory of each."""
    import tempfile
    import time
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from fastlm import FastLanguageModel
    from fastlm.bench.shapes import shape_config
    from fastlm.patch.fast_lora import install_fast_lora

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures.tiny import build_tokenizer

    result = {"precision": precision, "shape": shape, "batch": batch, "seq": seq}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            src = AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16)
        src.save_pretrained(tmp)
        build_tokenizer().save_pretrained(tmp)
        del src
        torch.cuda.empty_cache()
        model, _ = FastLanguageModel.from_pretrained(tmp, max_seq_length=seq, load_in_4bit=precision == "nf4",
                                                     load_in_16bit=precision != "nf4")
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=DEVICE,
                        generator=torch.Generator(device=DEVICE).manual_seed(0))

    def run(n):
        losses = []
        for _ in range(n):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.cuda.synchronize()
        return [round(v.item(), 4) for v in losses]

    for mode in ("peft", "fused"):
        undo = install_fast_lora(model) if mode == "fused" else None
        run(2)  # warm-up (kernels compile, allocator settles)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        losses = run(steps)
        elapsed = time.perf_counter() - t
        result[mode] = {"tokens_per_s": round(batch * seq * steps / elapsed),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2), "losses": losses}
        if undo is not None:
            result["fused"]["fused_mlps"], result["fused"]["fused_linears"] = undo.mlp_count, undo.linear_count
            undo()
    result["speedup"] = round(result["fused"]["tokens_per_s"] / result["peft"]["tokens_per_s"], 2)
    result["memory_ratio"] = round(result["fused"]["peak_gib"] / result["peft"]["peak_gib"], 3)
    del model, opt
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--kv", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--precisions", default="bf16,nf4")
    ap.add_argument("--train", default="bf16,nf4",
                    help="precisions of the whole-model training comparison ('' skips it)")
    ap.add_argument("--train-shape", default="llama-3.2-1b")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=2048)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_lora_check needs a CUDA GPU", file=sys.stderr)
        return 2
    rows, report, ok = [], {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "hidden": args.hidden,
                            "inter": args.inter, "rank": args.rank}, True
    for precision in args.precisions.split(","):
        model = build(precision, args.hidden, args.inter, args.kv, args.rank)
        if precision == "nf4":
            report["nf4_dequant"] = dq = check_dequant(model)
            ok &= dq["bit_exact"]
        torch.manual_seed(2)
        x = torch.randn(args.tokens, args.hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        for part, (layers, peft_fn, fused_fn) in cases(model).items():
            err, grads_out, params = compare(layers, peft_fn, fused_fn, x)
            (p_ms, p20, p80), p_mem = measure(peft_fn, x, grads_out, params)
            (f_ms, f20, f80), f_mem = measure(fused_fn, x, grads_out, params)
            passed = err <= TOL_BF16
            ok &= passed
            row = {"precision": precision, "part": part, "max_rel_err": round(err, 5), "ok": passed,
                   "peft_ms": [round(p_ms, 3), round(p20, 3), round(p80, 3)],
                   "fused_ms": [round(f_ms, 3), round(f20, 3), round(f80, 3)],
                   "speedup": round(p_ms / f_ms, 2), "peft_peak_mib": round(p_mem, 1),
                   "fused_peak_mib": round(f_mem, 1), "memory_ratio": round(f_mem / max(p_mem, 1e-9), 3)}
            rows.append(row)
        del model, x
        torch.cuda.empty_cache()
    train = []
    for precision in [p for p in args.train.split(",") if p]:
        try:
            train.append(train_steps(precision, args.train_shape, args.train_batch, args.train_seq))
        except Exception as exc:  # noqa: BLE001 - the kernel rows above still count; report the failure
            train.append({"precision": precision, "error": f"{type(exc).__name__}: {exc}"[:400]})
            ok = False
    report["rows"], report["train"], report["ok"] = rows, train, bool(ok)
    head = f"{'prec':5} {'part':4} {'err':>8} {'peft ms':>9} {'fused ms':>9} {'speedup':>7} {'peft MiB':>9} " \
           f"{'fused MiB':>9} {'mem x':>6}"
    print(head)
    for r in rows:
        print(f"{r['precision']:5} {r['part']:4} {r['max_rel_err']:8.5f} {r['peft_ms'][0]:9.3f} "
              f"{r['fused_ms'][0]:9.3f} {r['speedup']:7.2f} {r['peft_peak_mib']:9.1f} {r['fused_peak_mib']:9.1f} "
              f"{r['memory_ratio']:6.3f}")
    if "nf4_dequant" in report:
        d = report["nf4_dequant"]
        print(f"nf4 dequant {d['shape']}: bit-exact={d['bit_exact']} triton {d['triton_ms']} ms, "
              f"bitsandbytes {d['bnb_ms']} ms")
    for t in train:
        if "error" in t:
            print(f"train {t['precision']}: {t['error']}")
        else:
            print(f"train {t['precision']} {t['shape']} {t['batch']}x{t['seq']}: "
                  f"PEFT {t['peft']['tokens_per_s']} tok/s {t['peft']['peak_gib']} GiB | fused {t['fused']['tokens_per_s']} tok/s {t['fused']['peak_gib']} GiB"
                  f" | x{t['speedup']} speed, x{t['memory_ratio']} memory")
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
