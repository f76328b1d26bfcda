"""GPU re-check of the foundation path: load -> LoRA -> train steps -> generate, in bf16 and 4-bit on CUDA.

Builds a random-weight model of a real shape (Llama-3.2-1B-like by default) offline, then for each precision:
loads it with FastLanguageModel, adds LoRA, trains a few steps on a fixed batch (the loss must fall), switches to
inference and generates. Prints one JSON line per run and a table last. Run on the GPU machine as:

    PYTHONPATH=.gpu-site:. python scripts/gpu_check.py [--precisions bf16,4bit,8bit,fp8] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHAPES = {
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                       max_position_embeddings=4096),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=32000,
                        query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=4096),
}
PRECISIONS = {"bf16": dict(load_in_16bit=True), "4bit": dict(load_in_4bit=True), "8bit": dict(load_in_8bit=True),
              "fp8": dict(load_in_fp8=True)}


def build_model(shape: str, path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from fixtures.tiny import build_tokenizer

    kw = dict(SHAPES[shape])
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def run(path: Path, shape: str, precision: str, steps: int, seq: int, batch: int) -> dict:
    from fastlm import FastLanguageModel

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=seq, **PRECISIONS[precision])
    load_s = time.perf_counter() - t0
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    FastLanguageModel.for_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (batch, seq), generator=g).cuda()
    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    train_peak = torch.cuda.max_memory_allocated() / 2 ** 30
    FastLanguageModel.for_inference(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True).to("cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    torch.cuda.synchronize()
    gen_s = time.perf_counter() - t
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    result = dict(shape=shape, precision=precision, linear=type(q).__name__, dtype=str(model.get_base_model().dtype),
                  load_s=round(load_s, 2), loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                  loss_fell=losses[-1] < losses[0], step_ms_median=round(1000 * sorted(times[1:])[len(times[1:]) // 2], 1),
                  train_tokens_per_s=round(batch * seq / sorted(times[1:])[len(times[1:]) // 2]),
                  train_peak_gb=round(train_peak, 2), generated=int(out.shape[1] - prompt["input_ids"].shape[1]),
                  gen_tokens_per_s=round(32 / gen_s, 1), finite=all(map(lambda x: x == x, losses)))
    del model, opt
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-1b")
    ap.add_argument("--precisions", default="bf16,4bit")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "capability": torch.cuda.get_device_capability()}))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            path = build_model(shape, Path(tmp) / shape)
            for precision in args.precisions.split(","):
                try:
                    res = run(path, shape, precision, args.steps, args.seq, args.batch)
                except Exception as exc:  # noqa: BLE001 - report every combination
                    res = dict(shape=shape, precision=precision, error=f"{type(exc).__name__}: {exc}"[:300])
                print(json.dumps(res), flush=True)
                results.append(res)
    cols = ["shape", "precision", "linear", "loss_first", "loss_last", "step_ms_median", "train_peak_gb",
            "gen_tokens_per_s", "error"]
    print("\n" + " | ".join(cols))
    for r in results:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    ok = all(r.get("loss_fell") and r.get("finite") and r.get("generated") == 32 for r in results)
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
