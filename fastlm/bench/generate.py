"""`fastlm bench generate`: transformers' generate and the fastlm engine on one random-weight model of a named real
shape, in one run.

Prints batch-1 tokens/s for both, achieved GB/s (weight bytes x tokens/s) and its fraction of a device-to-device
copy bandwidth measured in the same run, time to first token, batch 8 and 64 throughput, the compile + capture
time on its own line, and one JSON line last. Runs on CPU too (no graphs; use the tiny-llama shape there).

    python -m fastlm.bench.generate --shape llama-3.2-1b --lora-rank 16
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def build_model(shape: str, dtype: torch.dtype, device: str, lora_rank: int = 0, load_in_4bit: bool = False,
                seed: int = 0):
    """A random-weight model of the shape on the device (initialised there), optionally with a LoRA adapter
    whose B is non-zero (so the adapter really changes the output)."""
    from transformers import AutoModelForCausalLM

    from .shapes import shape_config

    torch.manual_seed(seed)
    config = shape_config(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    if load_in_4bit:
        model = _quantize_4bit(model)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=False,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg).eval()
        model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return model


def _quantize_4bit(model):
    """Swap the decoder layers' linear layers for bitsandbytes NF4 ones (lm_head and embeddings stay 16-bit, as
    transformers' 4-bit loading does)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("bitsandbytes", "--load-in-4bit", 'pip install "fastlm[quant]"') from exc
    layers = model.model.layers
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
                setattr(parent, name, q.to(child.weight.device))
    return model


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    if device != "cuda":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 20 if device == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    seconds = (time.perf_counter() - start) / reps
    return 2 * nbytes / seconds / 1e9


def hf_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, device: str) -> float:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(prompt, **dict(kw, max_new_tokens=2, min_new_tokens=2))  # warm-up
    _sync(device)
    start = time.perf_counter()
    out = model.generate(prompt, **kw)
    _sync(device)
    return (out.shape[1] - prompt.shape[1]) * prompt.shape[0] / (time.perf_counter() - start)


def engine_run(engine, prompts: list[list[int]], new_tokens: int, device: str, sync_every: int = 16):
    """Greedy generation of new_tokens per prompt (EOS ignored); returns (tokens/s, ttft seconds, outputs)."""
    from ..inference.sampling import SamplingParams
    from ..inference.scheduler import Request, Scheduler

    sched = Scheduler(engine, sync_every=sync_every)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        sched.add(Request(p, params, tag=i))
    _sync(device)
    start = time.perf_counter()
    sched._admit()  # prefill + first token: time to first token
    sched.n_gen.tolist()
    ttft = time.perf_counter() - start
    results = sched.run_all()
    _sync(device)
    total = sum(len(r.token_ids) for r in results)
    return total / (time.perf_counter() - start), ttft, sorted(results, key=lambda r: r.request.tag)


def main(argv=None) -> dict:
    from .shapes import shape_names

    ap = argparse.ArgumentParser(prog="fastlm bench generate", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=shape_names())
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 CPU")
    ap.add_argument("--lora-rank", type=int, default=16, help="0: no adapter")
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes for fastlm")
    ap.add_argument("--hf-new-tokens", type=int, default=None, help="HF baseline tokens (default: --new-tokens)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")]
    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches or min(batches) < 1 or args.prompt_len < 1 or args.new_tokens < 1:
        ap.error("batch sizes, --prompt-len and --new-tokens must be >= 1")

    from ..inference.engine import Engine

    model = build_model(args.shape, dtype, device, args.lora_rank, args.load_in_4bit)
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (max(batches), args.prompt_len), generator=gen)
    wbytes = weight_bytes(model)
    copy_gbps = copy_bandwidth_gbps(device)
    result = dict(shape=args.shape, dtype=str(dtype).replace("torch.", ""), lora_rank=args.lora_rank,
                  load_in_4bit=args.load_in_4bit, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  weight_gb=round(wbytes / 1e9, 3), weight_bytes=wbytes, copy_gbps=round(copy_gbps, 1), device=_device_name(device),
                  torch=torch.__version__)
    if not args.skip_hf:
        hf_new = args.hf_new_tokens or args.new_tokens
        result["hf_tok_s_b1"] = round(hf_tokens_per_s(model, prompts[:1].to(device), hf_new, device), 2)
        print(f"HF generate     batch 1: {result['hf_tok_s_b1']:.1f} tokens/s")

    engine = Engine(model, max_slots=max(batches), max_len=args.prompt_len + args.new_tokens + 1)
    start = time.perf_counter()
    engine.warmup(batches)
    result["warmup_s"] = round(time.perf_counter() - start, 2)
    result["decode_attention"] = engine.view.compiled_attention if engine.use_compile else "eager"
    print(f"compile + capture: {result['warmup_s']:.1f} s (batches {batches}, "
          f"graphs={'on' if engine.use_graphs else 'off'}, compiled={engine.use_compile}, fused={engine.view.fused}, "
          f"attention={result['decode_attention']})")
    for b in batches:
        rows = prompts[:b].tolist()
        engine_run(engine, rows, min(8, args.new_tokens), device)  # warm the prefill shapes
        tps, ttft, _ = engine_run(engine, rows, args.new_tokens, device)
        result[f"fastlm_tok_s_b{b}"] = round(tps, 2)
        result[f"ttft_ms_b{b}"] = round(ttft * 1e3, 2)
        line = f"fastlm engine   batch {b}: {tps:.1f} tokens/s, time to first token {ttft * 1e3:.1f} ms"
        if b == 1:
            gbps = wbytes * tps / 1e9
            result["gbps_b1"] = round(gbps, 3)
            result["bandwidth_fraction_b1"] = round(gbps / copy_gbps, 5)
            line += f", {gbps:.0f} GB/s = {gbps / copy_gbps:.0%} of copy bandwidth {copy_gbps:.0f} GB/s"
        print(line)
    if device == "cuda":  # the whole process: the model, HF's generate, the engine's cache and graphs
        result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        print(f"peak GPU memory (torch.cuda.max_memory_allocated, whole run): {result['peak_gb']:.2f} GB")
    if "hf_tok_s_b1" in result and "fastlm_tok_s_b1" in result:
        result["speedup_b1"] = round(result["fastlm_tok_s_b1"] / result["hf_tok_s_b1"], 2)
    print(json.dumps(result))
    return result


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
