"""Give untrained tokens that the training data uses a usable embedding before training.

Base checkpoints often ship all-zero rows for tokens that were added but never trained (chat-template tokens such as
``<|im_start|>`` in a base Llama-3 or Qwen). Fine-tuning on data that uses them, a zero input row makes the hidden state
ignore the token, and a zero ``lm_head`` row gives it logit 0, which LoRA cannot fix because neither matrix is trained.
Matches Unsloth's ``fix_untrained_tokens``: a row is untrained when ``max(|row|) <= eps`` in the input embedding or in
an untied ``lm_head``; the untrained rows whose ids the data uses are set to the mean of the trained rows (each
matrix its own mean, computed in float32); untrained rows the data does not use are left alone.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["fix_untrained_tokens", "find_untrained_rows", "used_token_ids"]

_MAX_NAMED = 20  # token names shown in the notice


def _vocab_weights(module: torch.nn.Module | None, rows: int | None = None) -> list[torch.Tensor]:
    """The float 2-D ``weight`` tensors of `module` with `rows` rows: the weight itself, or, for PEFT wrappers
    (``modules_to_save``, LoRA ``base_layer``), the original and each trainable copy. Quantized weights (packed
    uint8, shape not ``(rows, dim)``) are skipped."""
    if module is None:
        return []
    found, seen = [], set()
    for name, param in module.named_parameters():
        if not name.split(".")[-1] == "weight" or param.dim() != 2 or not param.dtype.is_floating_point:
            continue
        if rows is not None and param.shape[0] != rows:
            continue
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            found.append(param)
    return found


def _primary_weight(module: torch.nn.Module | None) -> torch.Tensor | None:
    weight = getattr(module, "weight", None) if module is not None else None
    if weight is None or weight.dim() != 2 or not weight.dtype.is_floating_point:
        return None
    return weight


@torch.no_grad()
def find_untrained_rows(weight: torch.Tensor, eps: float = 1e-16) -> torch.Tensor:
    """Bool tensor, shape ``(rows,)``: True where ``max(|weight[row]|) <= eps`` (weight shape ``(rows, dim)``)."""
    out = torch.empty(weight.shape[0], dtype=torch.bool, device=weight.device)
    for start in range(0, weight.shape[0], 16384):  # chunks keep the abs() copy small on 150k-row vocabularies
        out[start:start + 16384] = weight[start:start + 16384].abs().amax(dim=1) <= eps
    return out


def used_token_ids(tokenizer, train_dataset=None) -> set[int]:
    """Token ids the data uses: the ``input_ids`` of `train_dataset` (tokenizing its ``text`` column, or its
    ``messages`` with the chat template, when it has no ``input_ids``), or without a dataset the tokenizer's special
    and added tokens."""
    if train_dataset is None:
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {}))
        return ids
    columns = getattr(train_dataset, "column_names", None)
    if columns is None and isinstance(train_dataset, (list, tuple)) and train_dataset:
        columns = list(train_dataset[0])
    columns = columns or []
    if "input_ids" in columns:
        sequences = _column(train_dataset, "input_ids")
    elif "text" in columns:
        sequences = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in _column(train_dataset, "text"))
    elif "messages" in columns:
        sequences = (tokenizer(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"]
                     for m in _column(train_dataset, "messages"))
    else:
        raise ValueError(f"fix_untrained_tokens: train_dataset has columns {columns}; it needs 'input_ids', 'text' or "
                         "'messages'. Fix: pass the tokenized dataset (e.g. trainer.train_dataset) or None to check "
                         "only the special tokens.")
    seen = np.zeros(0, dtype=bool)
    for seq in sequences:
        arr = np.asarray(seq, dtype=np.int64).ravel()
        if arr.size == 0:
            continue
        top = int(arr.max())
        if top >= seen.size:
            seen = np.pad(seen, (0, top + 1 - seen.size))
        seen[arr[arr >= 0]] = True
    return {int(i) for i in np.flatnonzero(seen)}


def _column(dataset, column: str) -> Iterable:
    """Values of one column, read in batches for ``datasets`` tables."""
    if hasattr(dataset, "iter") and hasattr(dataset, "select_columns"):
        for batch in dataset.select_columns([column]).iter(batch_size=1024):
            yield from batch[column]
    else:
        for example in dataset:
            yield example[column]


def _token_names(tokenizer, ids: list[int]) -> list[str]:
    names = []
    for i in ids[:_MAX_NAMED]:
        try:
            names.append(tokenizer.convert_ids_to_tokens(int(i)))
        except Exception:  # an id past the tokenizer's vocabulary (padded embedding)
            names.append(f"<id {i}>")
    return names


@torch.no_grad()
def fix_untrained_tokens(model, tokenizer, train_dataset=None, eps: float = 1e-16) -> list[int]:
    """Sets the embedding (and untied ``lm_head``) rows of untrained tokens that the data uses to the mean of the
    trained rows, logs one notice naming them, and returns their ids (sorted).

    model: an HF model or a PEFT-wrapped one (the embedding is found with ``get_input_embeddings()``); 4-bit models
    work when their embedding and ``lm_head`` are not quantized (bitsandbytes skips them by default).
    train_dataset: rows with ``input_ids`` (or ``text`` / ``messages``); None checks the special and added tokens.
    """
    embedding = model.get_input_embeddings()
    input_weight = _primary_weight(embedding)
    if input_weight is None:
        logger.info("fix_untrained_tokens: the input embedding has no float weight matrix; nothing checked")
        return []
    rows = input_weight.shape[0]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = _primary_weight(output)
    if output_weight is not None and (output_weight.shape[0] != rows
                                      or output_weight.data_ptr() == input_weight.data_ptr()):
        output_weight = None  # tied to the input embedding, or not a vocabulary projection

    untrained = find_untrained_rows(input_weight, eps)
    if output_weight is not None:
        untrained |= find_untrained_rows(output_weight, eps).to(untrained.device)
    if not bool(untrained.any()):
        return []
    used = torch.zeros(rows, dtype=torch.bool, device=untrained.device)
    used_ids = [i for i in used_token_ids(tokenizer, train_dataset) if 0 <= i < rows]
    if used_ids:
        used[torch.tensor(used_ids, device=untrained.device)] = True
    to_fix = untrained & used
    fixed = torch.nonzero(to_fix).flatten().tolist()
    if not fixed:
        logger.info("fix_untrained_tokens: %d untrained embedding rows, none used by the training data; left as is",
                    int(untrained.sum()))
        return []

    trained = ~untrained
    weights = _vocab_weights(embedding, rows)
    if output_weight is not None:
        input_ptrs = {w.data_ptr() for w in weights}
        weights += [w for w in _vocab_weights(output, rows) if w.data_ptr() not in input_ptrs]
    for weight in weights:
        keep = trained.to(weight.device)
        mean = weight[keep].float().mean(dim=0) if bool(keep.any()) else weight.new_zeros(weight.shape[1])
        weight[to_fix.to(weight.device)] = mean.to(dtype=weight.dtype)

    names = _token_names(tokenizer, fixed)
    more = f" and {len(fixed) - _MAX_NAMED} more" if len(fixed) > _MAX_NAMED else ""
    where = "input embedding and lm_head" if output_weight is not None else "input embedding"
    logger.warning("fastlm: %d token%s used by the training data had untrained (all-zero) rows in the %s and were set "
                   "to the mean embedding: %s%s", len(fixed), "s" if len(fixed) != 1 else "", where, names, more)
    return fixed
