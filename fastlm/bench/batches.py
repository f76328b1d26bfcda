"""Seeded random training batches for the training benchmark, identical in every process that asks.

Dense: `batch` rows of `seq_len` random token ids, labels = inputs.
Variable length: `batch` sequences per step with lengths drawn uniformly from [min(64, seq_len), seq_len], given
either *padded* (right padding to the longest, attention_mask, labels -100 on padding) or *packed* (one row holding
all sequences back to back, `position_ids` restarting at 0 for each sequence, the first label of each sequence -100).
Both forms score exactly the same (context, next token) pairs: in the padded form a sequence's last token predicts a
masked pad, in the packed form it predicts the masked first token of the next sequence. So the mean loss is the same
and `tokens` (the real tokens of the step) is the same for both.
"""
from __future__ import annotations

import torch

FIRST_TOKEN_ID = 4  # ids 0..3 are the benchmark tokenizer's specials (<unk>, <s>, </s>, <pad>)
PAD_ID = 3
MIN_SEQUENCE_LENGTH = 64


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def dense_batch(seed: int, step: int, batch: int, seq_len: int, vocab_size: int) -> dict:
    """`{"input_ids", "labels"}` of shape (batch, seq_len), plus `tokens` = batch * seq_len."""
    ids = torch.randint(FIRST_TOKEN_ID, vocab_size, (batch, seq_len), generator=_generator(seed, step))
    return {"input_ids": ids, "labels": ids.clone(), "tokens": batch * seq_len}


def variable_sequences(seed: int, step: int, batch: int, seq_len: int, vocab_size: int) -> list[torch.Tensor]:
    """`batch` 1-D sequences of random ids with lengths in [min(64, seq_len), seq_len]."""
    gen = _generator(seed, step)
    low = min(MIN_SEQUENCE_LENGTH, seq_len)
    lengths = torch.randint(low, seq_len + 1, (batch,), generator=gen).tolist()
    return [torch.randint(FIRST_TOKEN_ID, vocab_size, (n,), generator=gen) for n in lengths]


def padded_batch(sequences: list[torch.Tensor]) -> dict:
    """Right-padded to the longest: input_ids/attention_mask/labels of shape (len(sequences), longest)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tokens": int(mask.sum())}


def packed_batch(sequences: list[torch.Tensor]) -> dict:
    """One row of all sequences back to back: input_ids/position_ids/labels of shape (1, total tokens)."""
    ids = torch.cat(sequences).unsqueeze(0)
    positions = torch.cat([torch.arange(len(s)) for s in sequences]).unsqueeze(0)
    labels = ids.clone()
    labels[positions == 0] = -100  # the previous sequence's last token must not learn to predict this one
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "tokens": int(ids.shape[1])}


def make_batch(seed: int, step: int, batch: int, seq_len: int, vocab_size: int, layout: str) -> dict:
    """The batch of one step. `layout`: "dense", "padded" or "packed" (the last two hold the same sequences)."""
    if layout == "dense":
        return dense_batch(seed, step, batch, seq_len, vocab_size)
    sequences = variable_sequences(seed, step, batch, seq_len, vocab_size)
    if layout == "padded":
        return padded_batch(sequences)
    if layout == "packed":
        return packed_batch(sequences)
    raise ValueError(f"layout {layout!r}: expected 'dense', 'padded' or 'packed'")
