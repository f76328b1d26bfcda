"""`model.save_pretrained_merged(dir, tokenizer, save_method=...)`: merged 16-bit, merged 4-bit, or the adapter alone.

merged_16bit: LoRA folded into the weights (for a 4-bit model: into the original 16-bit weights, read shard by shard
from the source checkpoint), written as sharded safetensors that transformers / vLLM load as a plain model.
merged_4bit: the same merge, quantized to bitsandbytes NF4 (double quant) and saved so that transformers reloads it.
lora: the PEFT adapter alone (adapter_config.json + adapter_model.safetensors).
All three write the tokenizer, chat template and a generation config whose EOS list stops at the end of a turn, go
through a temporary directory renamed into place, and then reload the result and compare it with the model.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ProblemList
from ..state import get_state
from ..utils.safe_write import atomic_directory, check_free_space, refuse_source_dir
from .model_files import device_map, write_model_files, write_safetensors_shards
from .weights import merged_nbytes, merged_tensors, model_dtype

logger = logging.getLogger(__name__)

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
_ALIASES = {"merged_4bit_forced": "merged_4bit", "lora_only": "lora"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MARGIN = 64 << 20


def _size_to_bytes(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def resolve_dtype(dtype, model) -> torch.dtype:
    if dtype is None:
        return model_dtype(model)
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES[str(dtype).replace("torch.", "")]


def check_unknown_kwargs(p: ProblemList, kwargs: dict, hint: str) -> None:
    for key, value in kwargs.items():
        p.add(key, value, "not an argument of this export", hint)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _shard_bytes(max_shard_size, maximum_memory_usage: float) -> int:
    """Shard size: `max_shard_size`, but no more than half of `maximum_memory_usage` of the free RAM."""
    from ..utils.memory import available_ram_bytes

    cap = _size_to_bytes(max_shard_size)
    free = available_ram_bytes()
    if free:
        cap = min(cap, max(64 << 20, int(free * maximum_memory_usage / 2)))
    return cap


def save_pretrained_merged(model, save_directory, tokenizer=None, save_method="merged_16bit", push_to_hub=False,
                           token=None, private=None, maximum_memory_usage=0.75, max_shard_size="5GB", dtype=None,
                           verify=True, overwrite=True, commit_message=None, **kwargs) -> dict | None:
    """Write the merged model (or the adapter) to `save_directory`; returns the verification report (None when
    verify=False). `dtype`: the merged weights' dtype (default: the model's compute dtype)."""
    p = ProblemList("save_pretrained_merged")
    method = _ALIASES.get(save_method, save_method)
    if method not in SAVE_METHODS:
        p.add("save_method", save_method, f"one of {SAVE_METHODS}", 'use save_method="merged_16bit"')
    if method == "lora" and not is_peft(model):
        p.add("save_method", save_method, "'lora' needs a model with LoRA adapters (from get_peft_model)",
              "use save_method='merged_16bit' for a model without adapters")
    if not isinstance(maximum_memory_usage, (int, float)) or not 0 < maximum_memory_usage <= 0.95:
        p.add("maximum_memory_usage", maximum_memory_usage, "a fraction in (0, 0.95]", "use 0.75")
    if dtype is not None and not isinstance(dtype, torch.dtype) and str(dtype).replace("torch.", "") not in _DTYPES:
        p.add("dtype", dtype, f"None, a torch dtype or one of {sorted(_DTYPES)}", "use dtype=torch.bfloat16")
    try:
        _size_to_bytes(max_shard_size)
    except ValueError:
        p.add("max_shard_size", max_shard_size, "bytes or a size like '5GB'", "use '5GB'")
    if push_to_hub and not isinstance(push_to_hub, (bool, str)):
        p.add("push_to_hub", push_to_hub, "False, True (with repo id = save_directory) or a repo id", "use False")
    check_unknown_kwargs(p, kwargs, "remove it; see help(model.save_pretrained_merged)")
    p.raise_if_any()

    state = get_state(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(state, "tokenizer", None)
    out_dtype = resolve_dtype(dtype, model)
    target = refuse_source_dir(save_directory, model, "save_pretrained_merged")
    if method == "lora":
        needed = sum(p_.numel() * p_.element_size() for n, p_ in model.named_parameters() if p_.requires_grad)
    else:
        needed = merged_nbytes(model, out_dtype) * (2 if method == "merged_4bit" else 1)
    check_free_space(target, needed + _MARGIN, "save_pretrained_merged")

    with atomic_directory(target, overwrite=overwrite, what="save_pretrained_merged") as tmp:
        if method == "lora":
            model.save_pretrained(str(tmp), safe_serialization=True,
                                  save_embedding_layers=vocab_resized(model) or "auto")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        elif method == "merged_16bit":
            write_merged(model, tokenizer, tmp, out_dtype, _shard_bytes(max_shard_size, maximum_memory_usage))
        else:
            write_merged_4bit(model, tokenizer, tmp, out_dtype, _shard_bytes(max_shard_size, maximum_memory_usage))
    logger.warning("fastlm: wrote %s export to %s", method, target)

    report = None
    if verify:
        from .verify import save_report, verify_reload

        quantized = method == "merged_4bit" or bool(state and state.quantization)
        checked = verify_reload(model, tokenizer, target, method, out_dtype, quantized)
        report = save_report(target, {"format": method, "dtype": str(out_dtype), "checks": [checked]})
    if push_to_hub:
        from .hub import upload_folder

        repo_id = push_to_hub if isinstance(push_to_hub, str) else str(save_directory)
        upload_folder(target, repo_id, token=token, private=private, commit_message=commit_message)
    return report


def vocab_resized(model) -> bool:
    """True when the embedding rows differ from the source checkpoint's vocab (tokens were added at load)."""
    from ..state import base_model_of

    state = get_state(model)
    source_vocab = getattr(getattr(state, "source", None), "config", {}).get("vocab_size")
    rows = base_model_of(model).get_input_embeddings().weight.shape[0]
    return source_vocab is not None and source_vocab != rows


def write_merged(model, tokenizer, directory: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """Merged weights as sharded safetensors plus config, generation config and tokenizer."""
    from .progress import byte_progress

    with byte_progress(merged_nbytes(model, dtype), "merging") as bar:
        write_safetensors_shards(merged_tensors(model, dtype), directory, shard_bytes, bar)
    write_model_files(model, tokenizer, directory, dtype)


def write_merged_4bit(model, tokenizer, directory: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """Merge into 16-bit, quantize with bitsandbytes NF4 (double quant) while reloading, save."""
    from transformers import BitsAndBytesConfig

    from ..utils.imports import require

    require("bitsandbytes", "save_method='merged_4bit'", "pip install bitsandbytes")
    compute = dtype if dtype != torch.float32 or not torch.cuda.is_available() else torch.bfloat16
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute)
    write_quantized(model, tokenizer, directory, dtype, qconfig, shard_bytes)


def write_quantized(model, tokenizer, directory: Path, dtype: torch.dtype, quantization_config, shard_bytes: int,
                    save=None):
    """Merge into a scratch 16-bit checkpoint inside `directory` (a fresh temporary directory), reload it through
    transformers with `quantization_config`, and save the quantized model (by `save(model, dir)` when given) with
    the generation config and tokenizer. Returns the quantized model."""
    from transformers import AutoModelForCausalLM

    scratch = Path(tempfile.mkdtemp(prefix=".merged16-", dir=directory))  # removed below; a kill: inside the temp dir
    try:
        write_merged(model, tokenizer, scratch, dtype, shard_bytes)
        quant = AutoModelForCausalLM.from_pretrained(scratch, quantization_config=quantization_config, dtype=dtype,
                                                     device_map=device_map())
        if save is not None:
            save(quant, directory)
        else:
            quant.save_pretrained(directory, safe_serialization=True)
        if (scratch / "generation_config.json").is_file():
            shutil.copy2(scratch / "generation_config.json", directory / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return quant
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
