"""The processes of `fastlm bench train`: build the random model once, then train one side per process.

`build_model_dir` writes a seeded random-weight model of a named shape (safetensors, bf16 on CUDA / fp32 on CPU) plus
a 4-token tokenizer; both sides load it, so their weights are identical. The model is initialised on the GPU when
there is one (an 8B model initialises in seconds there, minutes on CPU) and written once; each side then reads it
from page cache / tmpfs, which is faster than initialising it again and makes 4-bit loading go through the same
`from_pretrained` quantization path a user takes.

`train_side` loads one side ("hf": plain transformers + PEFT as their docs show; "fastlm": FastLanguageModel),
trains `warmup + steps` steps on the seeded batches and returns tokens/s over the timed steps, the peak memory over
the whole process (weights included) and the loss of every step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from .batches import PAD_ID, make_batch

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUILD_MARKER = "fastlm_bench_build.json"


def device_and_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def _bench_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": PAD_ID}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_model_dir(shape: str, out_dir: Path, seed: int) -> dict:
    """Write the random model of `shape` to `out_dir` (which must be empty or absent). Returns the build record."""
    from transformers import AutoModelForCausalLM

    from .shapes import shape_config

    device, dtype = device_and_dtype()
    config = shape_config(shape)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _bench_tokenizer().save_pretrained(out_dir)
    record = {"shape": shape, "seed": seed, "dtype": str(dtype).replace("torch.", ""), "device": device,
              "parameters": params, "build_s": round(time.perf_counter() - t0, 2)}
    (out_dir / BUILD_MARKER).write_text(json.dumps(record))
    return record


def _enable_hf_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_hf(model_dir: Path, bits: int, rank: int, seed: int, dtype: torch.dtype, device: str):
    """Plain transformers + PEFT, as their documentation shows it (QLoRA: prepare_model_for_kbit_training)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation="sdpa", device_map={"": 0} if device == "cuda" else "cpu")
    if bits == 4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if bits == 4:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        _enable_hf_checkpointing(model)
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # the LoRA A init; fastlm's get_peft_model seeds with random_state at the same point
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGET_MODULES, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    return model


def load_fastlm(model_dir: Path, bits: int, rank: int, seed: int, dtype: torch.dtype, max_seq_length: int,
                offload_embedding: bool = False, tiled_mlp: bool = False):
    """The user's path: FastLanguageModel.from_pretrained + get_peft_model(use_gradient_checkpointing="unsloth")."""
    from fastlm.api import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=max_seq_length, dtype=dtype,
                                                 load_in_4bit=bits == 4, random_state=seed,
                                                 offload_embedding=offload_embedding, unsloth_tiled_mlp=tiled_mlp)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank, lora_dropout=0,
                                             target_modules=TARGET_MODULES, use_gradient_checkpointing="unsloth",
                                             random_state=seed, max_seq_length=max_seq_length)
    FastLanguageModel.for_training(model)
    return model


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _peak_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    from ..utils.memory import peak_rss_gb

    return peak_rss_gb()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batch_layout(side: str, padding_free: bool) -> str:
    """How `side` receives the batches: "dense", or with --padding-free fastlm "packed" and HF "padded"."""
    return "dense" if not padding_free else ("packed" if side == "fastlm" else "padded")


def make_optimizer(model, lr: float):
    """AdamW (no weight decay) over the trainable parameters. Returns (optimizer, those parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), params


def device_inputs(data: dict, device: str) -> dict:
    """A `make_batch` result as model keyword arguments on `device` (its "tokens" count stays behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in data.items() if k != "tokens"}


def train_step(model, optimizer, inputs: dict, dtype: torch.dtype, autocast: bool, mark=None) -> float:
    """One step: forward (bf16 autocast on CUDA), backward, AdamW step, gradients dropped. Returns the loss.
    `mark(phase)`, when given, is called after "forward", "backward" and "optimizer" (memory tracing)."""
    with torch.autocast(device_type="cuda", dtype=dtype) if autocast else contextlib.nullcontext():
        loss = model(**inputs, use_cache=False).loss
    if mark is not None:
        mark("forward")
    loss.backward()
    if mark is not None:
        mark("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if mark is not None:
        mark("optimizer")
    return loss.item()  # synchronises


def train_side(side: str, model_dir: Path, *, bits: int, batch: int, seq_len: int, rank: int, steps: int,
               warmup: int, lr: float, seed: int, padding_free: bool, offload_embedding: bool = False,
               tiled_mlp: bool = False) -> dict:
    """Load `side` and train. Returns the result record (status "ok" / "OOM" / "error")."""
    device, dtype = device_and_dtype()
    autocast = device == "cuda"
    record = {"side": side, "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda"
              else "cpu", "dtype": str(dtype).replace("torch.", ""), "autocast": autocast,
              "memory": "torch.cuda.max_memory_allocated over the whole process (weights included)"
              if device == "cuda" else "peak resident memory of the process (no GPU)"}
    layout = batch_layout(side, padding_free)
    record["layout"] = layout
    losses: list[float] = []
    times: list[float] = []
    tokens = 0
    try:
        t0 = time.perf_counter()
        if side == "hf":
            model = load_hf(model_dir, bits, rank, seed, dtype, device)
        else:
            model = load_fastlm(model_dir, bits, rank, seed, dtype, seq_len, offload_embedding, tiled_mlp)
        _sync(device)
        record["load_s"] = round(time.perf_counter() - t0, 2)
        # the process peak so far: loading alone (peak_gb, the whole process, is at least this), which tells
        # whether a side's peak comes from training at all
        record["load_peak_gb"] = round(_peak_gb(device), 3)
        vocab = model.get_input_embeddings().weight.shape[0]
        optimizer, params = make_optimizer(model, lr)
        record["trainable_parameters"] = sum(p.numel() for p in params)
        for step in range(warmup + steps):
            data = make_batch(seed, step, batch, seq_len, vocab, layout)
            inputs = device_inputs(data, device)
            _sync(device)
            start = time.perf_counter()
            value = train_step(model, optimizer, inputs, dtype, autocast)
            _sync(device)
            losses.append(value)
            if step >= warmup:
                times.append(time.perf_counter() - start)
                tokens += data["tokens"]
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which keeps going
        if isinstance(exc, KeyboardInterrupt):
            raise
        record.update(status="OOM" if _is_oom(exc) else "error", error=f"{type(exc).__name__}: {exc}"[:2000],
                      losses=losses, peak_gb=round(_peak_gb(device), 3))
        return record
    total = sum(times)
    record.update(status="ok", losses=losses, timed_steps=len(times), tokens=tokens,
                  tokens_per_s=round(tokens / total, 1) if total > 0 else None,
                  step_ms_median=round(1000 * statistics.median(times), 2) if times else None,
                  step_ms_p20=round(1000 * _percentile(times, 0.2), 2) if times else None,
                  step_ms_p80=round(1000 * _percentile(times, 0.8), 2) if times else None,
                  peak_gb=round(_peak_gb(device), 3))
    if device == "cuda":
        record["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 3)
    return record


def versions() -> dict:
    import peft
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - optional
        pass
    return out


def worker_main(args) -> int:
    """`python -m fastlm.bench.train --worker {build,hf,fastlm} ...`: do one job, write its JSON to --result."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = Path(args.model_dir)
    if args.worker == "build":
        record = build_model_dir(args.shape, model_dir, args.seed)
    else:
        record = train_side(args.worker, model_dir, bits=args.bits, batch=args.batch, seq_len=args.seq_len,
                            rank=args.rank, steps=args.steps, warmup=args.warmup, lr=args.lr, seed=args.seed,
                            padding_free=args.padding_free, offload_embedding=args.offload_embedding,
                            tiled_mlp=args.tiled_mlp)
        record["versions"] = versions()
    Path(args.result).write_text(json.dumps(record))
    return 0
