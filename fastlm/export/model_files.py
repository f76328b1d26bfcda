"""The files beside the weights: config, generation config, tokenizer and chat template, with one consistent set of
special-token ids (the EOS list includes the chat template's end-of-turn token so generation stops)."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..state import base_model_of

logger = logging.getLogger(__name__)

_SAMPLE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def end_of_turn_token(tokenizer) -> tuple[int, str] | None:
    """The special token the chat template puts right after an assistant message (e.g. `<|im_end|>`), if any."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(_SAMPLE_CHAT, tokenize=False)
    except Exception:  # noqa: BLE001 - templates that need other roles: no end-of-turn token found
        return None
    idx = text.rfind("Hello")
    if idx < 0:
        return None
    ids = tokenizer(text[idx + len("Hello"):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in ids:
        if i in special:
            return i, tokenizer.convert_ids_to_tokens(i)
    return None


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(tokenizer, config=None) -> list[int]:
    """EOS ids in order: the tokenizer's EOS, the chat template's end-of-turn, then the config's own."""
    ids: list[int] = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids.append(eot[0])
    if config is not None:
        ids += _as_list(getattr(config, "eos_token_id", None))
    out: list[int] = []
    for i in ids:
        if i not in out:
            out.append(i)
    return out


def export_config(model, dtype: torch.dtype, keep_quantization: bool = False):
    """A copy of the model's config for a plain (unquantized) checkpoint at `dtype`."""
    config = copy.deepcopy(base_model_of(model).config)
    if not keep_quantization:
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
    config.dtype = dtype
    return config


def write_model_files(model, tokenizer, directory: Path, dtype: torch.dtype, keep_quantization: bool = False) -> None:
    """config.json, generation_config.json and the tokenizer files, with consistent special-token ids."""
    base = base_model_of(model)
    config = export_config(model, dtype, keep_quantization)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(directory)
    gen = copy.deepcopy(getattr(base, "generation_config", None))
    if gen is not None:
        eos = stop_token_ids(tokenizer, gen) or _as_list(getattr(config, "eos_token_id", None))
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id
        if tokenizer is not None and tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id
        gen.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_safetensors_shards(items, directory: Path, shard_bytes: int, progress=None) -> int:
    """Write `(name, tensor)` items into safetensors shards of at most `shard_bytes` (plus an index when there is
    more than one), holding one shard in memory. Returns the total bytes written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    files: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal shard, size
        if not shard:
            return
        name = f"part-{len(files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(directory / name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard, size = {}, 0

    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
        if progress is not None:
            progress.update(nbytes)
    flush()
    if len(files) == 1:
        (directory / files[0][0]).rename(directory / "model.safetensors")
        return total
    weight_map = {}
    n = len(files)
    for i, (tmp_name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (directory / tmp_name).rename(directory / final)
        weight_map.update({k: final for k in keys})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def device_map():
    """Where a reloaded export goes for its check: the current GPU, or the CPU."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
