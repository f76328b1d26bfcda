"""`LoadPlan`: the arguments of `from_pretrained` checked as a whole before any weight is read.

Every problem is collected and reported at once (`ConfigError`), each naming the value, what is allowed and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ProblemList
from .rope_check import check_rope_scaling


class _DefaultTrue(int):
    """The default of `load_in_4bit`: truthy and shown as True, but known to be a default, so that asking for
    another precision (8-bit, 16-bit, full fine-tuning, FP8) switches 4-bit off instead of contradicting it."""

    def __new__(cls):
        return super().__new__(cls, 1)

    def __repr__(self) -> str:
        return "True"


DEFAULT_4BIT = _DefaultTrue()

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
GRADIENT_CHECKPOINTING_VALUES = (True, False, "unsloth")
# keyword arguments passed on to transformers' from_pretrained as they are
HF_PASSTHROUGH_KWARGS = frozenset({
    "attn_implementation", "cache_dir", "local_files_only", "max_memory", "offload_folder", "low_cpu_mem_usage",
    "force_download", "subfolder", "variant", "use_cache", "output_attentions", "output_hidden_states",
    "quantization_config", "use_safetensors", "torch_dtype",
})
FP8_MODES = (True, "row", "block")


@dataclass
class LoadPlan:
    """What will be loaded and how. Built by `build_load_plan`; fields are already validated."""

    model_name: str
    max_seq_length: int
    dtype: torch.dtype
    quantization: str | None  # None | "nf4" | "int8" | "fp8-row" | "fp8-block"
    full_finetuning: bool
    device_map: Any
    rope_scaling: dict | None
    fix_tokenizer: bool
    trust_remote_code: bool
    use_gradient_checkpointing: bool | str
    resize_model_vocab: int | None
    revision: str | None
    token: Any
    use_exact_model_name: bool
    offload_embedding: bool
    float32_mixed_precision: bool | None
    random_state: int | None
    unsloth_tiled_mlp: bool
    allow_pickle: bool = False
    hf_kwargs: dict = field(default_factory=dict)
    explicit_4bit: bool = False

    @property
    def load_in_4bit(self) -> bool:
        return self.quantization == "nf4"

    @property
    def load_in_8bit(self) -> bool:
        return self.quantization == "int8"


def resolve_dtype(dtype, on_cuda: bool, bf16_ok: bool) -> torch.dtype | None:
    """None -> bf16 where supported, else fp16 on GPU; fp32 on CPU. Strings and torch dtypes are accepted."""
    if dtype is None or dtype == "auto":
        if on_cuda:
            return torch.bfloat16 if bf16_ok else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        return _DTYPES.get(dtype.lower().replace("torch.", ""))
    if isinstance(dtype, torch.dtype) and dtype in (torch.float16, torch.bfloat16, torch.float32):
        return dtype
    return None


def build_load_plan(*, model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, load_in_16bit,
                    full_finetuning, token, device_map, rope_scaling, fix_tokenizer, trust_remote_code,
                    use_gradient_checkpointing, resize_model_vocab, revision, use_exact_model_name,
                    offload_embedding, float32_mixed_precision, fast_inference, gpu_memory_utilization,
                    float8_kv_cache, random_state, max_lora_rank, disable_log_stats, qat_scheme, load_in_fp8,
                    unsloth_tiled_mlp, extra_args, kwargs, on_cuda: bool, bf16_ok: bool,
                    cuda_capability: tuple[int, int] | None) -> LoadPlan:
    p = ProblemList("FastLanguageModel.from_pretrained")
    explicit_4bit = bool(load_in_4bit) and not isinstance(load_in_4bit, _DefaultTrue)

    if extra_args:
        p.add("*args", extra_args, "from_pretrained takes model_name as its only positional argument",
              "pass the other arguments by keyword, e.g. max_seq_length=2048")
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
        p.add("max_seq_length", max_seq_length, "a positive integer", "e.g. max_seq_length=2048")

    torch_dtype = resolve_dtype(dtype, on_cuda, bf16_ok)
    if torch_dtype is None:
        p.add("dtype", dtype, "None, torch.float16, torch.bfloat16 or torch.float32 (or their names)",
              "use dtype=None to pick the best for this machine")
    elif torch_dtype == torch.bfloat16 and on_cuda and not bf16_ok:
        p.add("dtype", dtype, "bfloat16 needs a GPU with compute capability >= 8.0", "use dtype=torch.float16")
    elif torch_dtype == torch.float16 and not on_cuda and (load_in_4bit or load_in_8bit):
        pass  # bitsandbytes on CPU computes in fp16 too; allowed

    # --- precision: one of 4-bit, 8-bit, 16-bit, fp8; full fine-tuning needs unquantized weights
    flags = [(n, bool(v)) for n, v in (("load_in_8bit", load_in_8bit), ("load_in_16bit", load_in_16bit),
                                       ("load_in_fp8", load_in_fp8 not in (False, None)))]
    chosen = [n for n, v in flags if v]
    if explicit_4bit:
        chosen.insert(0, "load_in_4bit")
    if len(chosen) > 1:
        p.add(" and ".join(chosen), True, "only one precision can be chosen",
              "keep one of load_in_4bit / load_in_8bit / load_in_16bit / load_in_fp8 and set the others to False")
    if full_finetuning and explicit_4bit:
        p.add("full_finetuning", True, "4-bit weights cannot be trained directly",
              "use load_in_4bit=False (16-bit) for full fine-tuning, or full_finetuning=False for QLoRA")
    if full_finetuning and load_in_8bit:
        p.add("full_finetuning", True, "8-bit weights cannot be trained directly",
              "use load_in_16bit=True for full fine-tuning, or full_finetuning=False for LoRA on 8-bit")
    quantization = None
    if load_in_fp8 not in (False, None):
        if load_in_fp8 not in FP8_MODES:
            p.add("load_in_fp8", load_in_fp8, "True, 'row' or 'block'", "use load_in_fp8=True (row-wise scales)")
        elif not on_cuda or cuda_capability is None or cuda_capability < (8, 9):
            p.add("load_in_fp8", load_in_fp8, "FP8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); "
                  f"this machine has {'no CUDA GPU' if not on_cuda else 'capability %d.%d' % cuda_capability}",
                  "use load_in_4bit=True or load_in_16bit=True here")
        quantization = "fp8-block" if load_in_fp8 == "block" else "fp8-row"
    elif load_in_8bit:
        quantization = "int8"
    elif load_in_16bit or full_finetuning:
        quantization = None
    elif load_in_4bit:
        quantization = "nf4"

    if use_gradient_checkpointing not in GRADIENT_CHECKPOINTING_VALUES:
        p.add("use_gradient_checkpointing", use_gradient_checkpointing, "True, False or 'unsloth'",
              "use 'unsloth' (the default)")
    check_rope_scaling(rope_scaling, p)
    check_device_map(device_map, on_cuda, p)
    if resize_model_vocab is not None and (not isinstance(resize_model_vocab, int) or resize_model_vocab <= 0):
        p.add("resize_model_vocab", resize_model_vocab, "None or a positive integer", "e.g. resize_model_vocab=32000")
    if random_state is not None and not isinstance(random_state, int):
        p.add("random_state", random_state, "an integer seed or None", "e.g. random_state=3407")
    if float32_mixed_precision not in (None, True, False):
        p.add("float32_mixed_precision", float32_mixed_precision, "None, True or False", "leave it as None")
    if qat_scheme is not None:
        from ..export.qat import QAT_SCHEMES

        if qat_scheme not in QAT_SCHEMES:
            p.add("qat_scheme", qat_scheme, f"None or one of {QAT_SCHEMES} (torchao fake quantization)",
                  'e.g. qat_scheme="int4", then save_pretrained_torchao converts to the real quantized model')
        elif qat_scheme.startswith("fp8") and not on_cuda:
            p.add("qat_scheme", qat_scheme, "FP8 schemes need a CUDA GPU", 'use "int4" or "int8-int4" on CPU')

    # --- vLLM engine arguments
    if fast_inference not in (True, False):
        p.add("fast_inference", fast_inference, "True or False", "use fast_inference=True for model.fast_generate "
              "through vLLM (the built-in engine serves it without vLLM)")
    if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization <= 1:
        p.add("gpu_memory_utilization", gpu_memory_utilization, "a fraction in (0, 1]", "e.g. 0.5")
    elif gpu_memory_utilization != 0.5 and not fast_inference:
        p.add("gpu_memory_utilization", gpu_memory_utilization, "only used by the vLLM engine (fast_inference=True)",
              "remove it")
    if float8_kv_cache and not fast_inference:
        p.add("float8_kv_cache", True, "only used by the vLLM engine (fast_inference=True)", "remove it")
    if not isinstance(max_lora_rank, int) or max_lora_rank <= 0:
        p.add("max_lora_rank", max_lora_rank, "a positive integer", "e.g. 64")
    elif max_lora_rank != 64 and not fast_inference:
        p.add("max_lora_rank", max_lora_rank, "only used by the vLLM engine (fast_inference=True)", "remove it")
    if disable_log_stats is not True and not fast_inference:
        p.add("disable_log_stats", disable_log_stats, "only used by the vLLM engine (fast_inference=True)",
              "remove it")

    if offload_embedding and not on_cuda:
        p.add("offload_embedding", True, "offloading the embedding to CPU needs the model on a GPU",
              "remove it on CPU machines (the whole model is already in CPU memory)")

    # --- keyword arguments passed to transformers
    hf_kwargs, allow_pickle = {}, False
    for key, value in kwargs.items():
        if key not in HF_PASSTHROUGH_KWARGS:
            p.add(key, value, "not an argument of from_pretrained; extra keywords allowed: "
                  + ", ".join(sorted(HF_PASSTHROUGH_KWARGS)), "remove it or check its spelling")
        elif key == "use_safetensors":
            allow_pickle = value is False
        elif key == "torch_dtype":
            p.add(key, value, "renamed to dtype in transformers 5", f"pass dtype={value!r}")
        else:
            hf_kwargs[key] = value
    if "quantization_config" in hf_kwargs and (explicit_4bit or load_in_8bit or load_in_fp8):
        p.add("quantization_config", "…", "a quantization_config replaces the load_in_* flags",
              "pass either quantization_config or one load_in_* flag")
    if "quantization_config" in hf_kwargs and not explicit_4bit:
        quantization = "custom"
    p.raise_if_any()

    return LoadPlan(
        model_name=str(model_name), max_seq_length=max_seq_length, dtype=torch_dtype, quantization=quantization,
        full_finetuning=bool(full_finetuning), device_map=device_map, rope_scaling=rope_scaling,
        fix_tokenizer=bool(fix_tokenizer), trust_remote_code=bool(trust_remote_code),
        use_gradient_checkpointing=use_gradient_checkpointing, resize_model_vocab=resize_model_vocab,
        revision=revision, token=token, use_exact_model_name=bool(use_exact_model_name),
        offload_embedding=bool(offload_embedding), float32_mixed_precision=float32_mixed_precision,
        random_state=random_state, unsloth_tiled_mlp=bool(unsloth_tiled_mlp), allow_pickle=allow_pickle,
        hf_kwargs=hf_kwargs, explicit_4bit=explicit_4bit)


DEVICE_MAP_STRINGS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda")


def _gpu_targets(device_map) -> list:
    """The parts of a device_map that name a GPU (cuda, cuda:N, an integer index)."""
    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    out = []
    for v in values:
        if isinstance(v, torch.device):
            v = str(v)
        if (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.startswith("cuda")):
            out.append(v)
    return out


def check_device_map(device_map, on_cuda: bool, p: ProblemList) -> None:
    """device_map: None, one of DEVICE_MAP_STRINGS, 'cuda:N', an integer GPU index, a torch.device or a dict of
    module name -> device. GPU targets need a CUDA GPU with that index."""
    ok_type = device_map is None or isinstance(device_map, (dict, torch.device)) or (
        isinstance(device_map, int) and not isinstance(device_map, bool) and device_map >= 0) or (
        isinstance(device_map, str) and (device_map in DEVICE_MAP_STRINGS or device_map.startswith("cuda:")
                                         or device_map in ("mps", "disk")))
    if not ok_type:
        p.add("device_map", device_map, "None, " + ", ".join(repr(s) for s in DEVICE_MAP_STRINGS)
              + ", 'cuda:N', a GPU index or a dict of module -> device", 'use device_map="auto"')
        return
    gpus = _gpu_targets(device_map)
    if gpus and not on_cuda:
        p.add("device_map", device_map, "GPU placement needs a CUDA GPU; this machine has none (torch sees no "
              "CUDA device)", 'use device_map="auto" (or "cpu"), which runs on the CPU here')
        return
    count = torch.cuda.device_count() if on_cuda else 0
    for g in gpus:
        index = g if isinstance(g, int) else (int(g.split(":", 1)[1]) if g.split(":", 1)[1:] and
                                              g.split(":", 1)[1].isdigit() else 0 if g == "cuda" else None)
        if index is None or index >= count:
            p.add("device_map", device_map, f"GPU indices 0..{count - 1} (this machine has {count} CUDA "
                  "device(s))", 'use device_map="auto" or a valid index')
            return

