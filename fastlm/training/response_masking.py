"""Train on assistant turns only: every other token's label becomes -100.

Matches Unsloth's ``train_on_responses_only(trainer, instruction_part, response_part)``: after a TRL ``SFTTrainer``
is built, the labels of everything that is not an assistant reply (system prompt, user turns, the turn headers) are
set to -100, so the loss is taken only over the replies and their end-of-turn tokens. Differences from Unsloth:

* The turn markers are read from the tokenizer's chat template, never from a per-model table: a probe conversation
  ``[user S1, assistant S2, user S3, assistant S4]`` with sentinel contents is rendered and the text between the
  sentinels is split into ``instruction_part`` (starts a user turn, e.g. ``"<|im_start|>user\\n"``),
  ``response_part`` (starts an assistant turn) and ``end_of_turn`` (closes an assistant turn, e.g.
  ``"<|im_end|>\\n"``). Explicit ``instruction_part`` / ``response_part`` override the detected ones.
* Markers are searched as token ids. A marker can tokenize differently alone than inside a conversation (``" [/INST] "``
  loses its trailing space to the next word), so each marker gets several candidate id sequences: its tokens inside the
  rendered probe, the same without trailing whitespace, and the marker tokenized alone (and stripped); the longest
  candidate that matches at a position wins.
* A reply ends at the next user-turn or assistant-turn marker, or just after the first ``end_of_turn`` that follows it
  when that marker was detected from the template and holds a special token; so system or tool turns between
  replies stay masked.
* It never trains silently on nothing: a batch whose labels are all -100 raises `ResponseMaskingError` with the
  markers, their token ids, a decoded sample and the fix; the first batches are checked at once and again when
  training begins.

Extension points used (no TRL source is changed): the already-tokenized ``trainer.train_dataset`` / ``eval_dataset``
get their ``labels`` column masked (``Dataset.map``), examples left with no trained token are dropped (with a
notice), and ``trainer.data_collator`` is wrapped so collated batches are masked the same way (this also covers
collators that rebuild labels from ``input_ids``) and checked.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from ..errors import FastLMError, ProblemList

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHECK_BATCHES = 4  # batches collated and checked before training
_SENTINELS = ("fastlmprobe1qz", "fastlmprobe2qz", "fastlmprobe3qz", "fastlmprobe4qz")
# columns a collator may read; others are dropped before the eager check when the trainer drops unused columns
_COLLATOR_COLUMNS = {"input_ids", "attention_mask", "labels", "seq_lengths", "position_ids", "token_type_ids",
                     "completion_mask", "assistant_masks"}

__all__ = ["ResponseMaskingError", "TurnMarkers", "ResponseMasker", "ResponseOnlyCollator",
           "ResponseMaskCheckCallback", "check_first_batches", "find_spans", "resolve_turn_markers",
           "train_on_responses_only"]


class ResponseMaskingError(FastLMError, ValueError):
    """The turn markers were not found: every label would be -100 and training would learn nothing."""


@dataclass(frozen=True)
class TurnMarkers:
    """Marker texts and the token-id sequences that locate them in ``input_ids`` (candidates, longest first).

    ``end_of_turn`` is "" (and ``end_of_turn_ids`` empty) when it is not used to end replies.
    ``source`` says where the texts came from: "chat template", "arguments" or a mix.
    """

    instruction: str
    response: str
    end_of_turn: str
    instruction_ids: tuple[tuple[int, ...], ...]
    response_ids: tuple[tuple[int, ...], ...]
    end_of_turn_ids: tuple[tuple[int, ...], ...]
    source: str

    def describe(self, sample_ids: Sequence[int] | None = None) -> str:
        """One line per marker: its text, its candidate token ids, and whether it occurs in `sample_ids`."""
        arr = None if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        lines = []
        for name, text, cands in (("instruction_part", self.instruction, self.instruction_ids),
                                  ("response_part", self.response, self.response_ids),
                                  ("end_of_turn", self.end_of_turn, self.end_of_turn_ids)):
            if name == "end_of_turn" and not text:
                continue
            found = "" if arr is None else f"  found in sample: {'yes' if find_spans(arr, cands) else 'NO'}"
            lines.append(f"  {name:<16} = {text!r}  token ids {[list(c) for c in cands]}{found}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# marker detection


def _tokenizer_of(processing_class):
    """The text tokenizer of a tokenizer or a multimodal processor."""
    return getattr(processing_class, "tokenizer", None) or processing_class


def _added_token_texts(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {str(t) for t in decoder.values()} | set(getattr(tokenizer, "all_special_tokens", []) or [])
    return [t for t in texts if t]


def _common_prefix(a: str, b: str, added_tokens: Sequence[str]) -> str:
    """Longest common prefix of `a` and `b`, cut back so that it never ends inside an added (special) token."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    for tok in added_tokens:
        start = a.find(tok)
        while start != -1 and start < n:
            if start < n < start + len(tok):
                n = start
            start = a.find(tok, start + 1)
    return a[:n]


@dataclass(frozen=True)
class _Probe:
    text: str
    instruction: str
    response: str
    end_of_turn: str


def _render_probe(tokenizer) -> str:
    s1, s2, s3, s4 = _SENTINELS
    messages = [{"role": "user", "content": s1}, {"role": "assistant", "content": s2},
                {"role": "user", "content": s3}, {"role": "assistant", "content": s4}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _split_probe(text: str, added_tokens: Sequence[str]) -> _Probe:
    """Split the rendered probe into the turn markers (see the module docstring)."""
    pos = [text.find(s) for s in _SENTINELS]
    if min(pos) < 0 or pos != sorted(pos):
        raise ValueError(f"the rendered probe does not hold the four message contents in order: {text!r}")
    ends = [p + len(s) for p, s in zip(pos, _SENTINELS)]
    user_to_asst = text[ends[0]:pos[1]]    # user-turn suffix + assistant-turn prefix
    asst_to_user = text[ends[1]:pos[2]]    # assistant-turn suffix + user-turn prefix
    after_last = text[ends[3]:]            # assistant-turn suffix (+ whatever ends a conversation)
    eot = _common_prefix(after_last, asst_to_user, added_tokens)
    instruction = asst_to_user[len(eot):]
    response = user_to_asst[len(eot):] if eot and user_to_asst.startswith(eot) else user_to_asst
    if not instruction.strip() or not response.strip():
        raise ValueError(f"could not separate the turn markers in the rendered probe {text!r} "
                         f"(user turn start {instruction!r}, assistant turn start {response!r})")
    return _Probe(text, instruction, response, eot)


def _token_candidates(tokenizer, marker: str, probe: _Probe | None) -> tuple[tuple[int, ...], ...]:
    """Id sequences that may spell `marker` in tokenized data, longest first.

    In context (inside the rendered probe, full and without trailing whitespace): tokens that lie wholly inside the
    marker's character span; a token that straddles the marker's edge belongs to the neighbouring text. Alone: the
    marker tokenized by itself, and stripped.
    """
    cands: list[tuple[int, ...]] = []
    if probe is not None and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(probe.text, add_special_tokens=False, return_offsets_mapping=True)
        spans = list(zip(enc["input_ids"], enc["offset_mapping"]))
        start = probe.text.find(marker)
        while start != -1:
            for end in (start + len(marker), start + len(marker.rstrip())):
                seq = tuple(i for i, (a, b) in spans if a >= start and b <= end and b > a)
                if seq:
                    cands.append(seq)
            start = probe.text.find(marker, start + 1)
    for text in (marker, marker.strip()):
        if text:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                cands.append(tuple(int(i) for i in ids))
    unique = list(dict.fromkeys(cands))
    return tuple(sorted(unique, key=len, reverse=True))


def resolve_turn_markers(processing_class, instruction_part: str | None = None,
                         response_part: str | None = None) -> TurnMarkers:
    """Marker texts (given, or detected from the chat template) and their candidate token ids."""
    problems = ProblemList("train_on_responses_only")
    for name, value in (("instruction_part", instruction_part), ("response_part", response_part)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.add(name, value, "a non-empty string: the exact text that starts that turn",
                         f"pass {name} as a string copied from a formatted example, or None to detect it")
    problems.raise_if_any()

    tokenizer = _tokenizer_of(processing_class)
    probe, probe_error = None, None
    if getattr(tokenizer, "chat_template", None):
        try:
            probe = _split_probe(_render_probe(tokenizer), _added_token_texts(tokenizer))
        except Exception as exc:  # any template failure: reported below only if the markers are needed
            probe_error = exc
    if (instruction_part is None or response_part is None) and probe is None:
        why = (f"rendering a probe conversation with its chat template failed: {probe_error}" if probe_error
               else "the tokenizer has no chat template")
        raise ResponseMaskingError(
            f"train_on_responses_only could not detect the turn markers: {why}. Fix: pass both markers, e.g. "
            "train_on_responses_only(trainer, instruction_part='<|im_start|>user\\n', "
            "response_part='<|im_start|>assistant\\n'), copying the exact text that starts a user turn and an "
            "assistant turn in your formatted data.")

    instruction = instruction_part if instruction_part is not None else probe.instruction
    response = response_part if response_part is not None else probe.response
    detected = probe is not None and instruction == probe.instruction and response == probe.response
    added = _added_token_texts(tokenizer)
    use_eot = detected and any(t in probe.end_of_turn for t in added)
    eot = probe.end_of_turn if use_eot else ""
    source = ("chat template" if instruction_part is None and response_part is None
              else "arguments" if instruction_part is not None and response_part is not None
              else "arguments and chat template")
    return TurnMarkers(
        instruction=instruction, response=response, end_of_turn=eot,
        instruction_ids=_token_candidates(tokenizer, instruction, probe),
        response_ids=_token_candidates(tokenizer, response, probe),
        end_of_turn_ids=_token_candidates(tokenizer, eot, probe) if eot else (),
        source=source)


# ----------------------------------------------------------------------------------------------------------------
# masking on token ids


def find_spans(ids: np.ndarray, candidates: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Non-overlapping ``(start, end)`` spans of `ids` (1-D int array) equal to any candidate, longest first."""
    n, hits = len(ids), []
    for seq in candidates:
        width = len(seq)
        if width == 0 or width > n:
            continue
        starts = np.flatnonzero(ids[: n - width + 1] == seq[0])
        if width > 1 and starts.size:
            windows = np.lib.stride_tricks.sliding_window_view(ids, width)[starts]
            starts = starts[(windows == np.asarray(seq, dtype=ids.dtype)).all(axis=1)]
        hits.extend((int(s), int(s) + width) for s in starts)
    hits.sort(key=lambda h: (h[0], -h[1]))
    spans, last_end = [], -1
    for start, end in hits:
        if start >= last_end:
            spans.append((start, end))
            last_end = end
    return spans


@dataclass(frozen=True)
class ResponseMasker:
    """Computes which tokens of a sequence belong to assistant replies. Picklable (dataset workers)."""

    markers: TurnMarkers

    def keep_mask(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Bool array, shape ``(len(ids),)``: True on reply tokens (after a response marker, through the reply's
        end-of-turn, up to the next instruction or response marker)."""
        arr = np.asarray(ids, dtype=np.int64)
        keep = np.zeros(arr.shape[0], dtype=bool)
        responses = find_spans(arr, self.markers.response_ids)
        if not responses:
            return keep
        stops = sorted([s for s, _ in find_spans(arr, self.markers.instruction_ids)] + [s for s, _ in responses])
        eots = find_spans(arr, self.markers.end_of_turn_ids)
        eot_starts = [s for s, _ in eots]
        for _, begin in responses:
            stop = arr.shape[0]
            i = bisect.bisect_left(stops, begin)
            if i < len(stops):
                stop = stops[i]
            j = bisect.bisect_left(eot_starts, begin)
            if j < len(eots):
                stop = min(stop, eots[j][1])
            keep[begin:stop] = True
        return keep

    def mask_labels(self, input_ids: Sequence[int], labels: Sequence[int] | None = None,
                    seq_lengths: Sequence[int] | None = None) -> list[int]:
        """`labels` (default: `input_ids`) with -100 outside replies; packed rows are split at `seq_lengths`."""
        ids = np.asarray(input_ids, dtype=np.int64)
        out = ids.copy() if labels is None else np.asarray(labels, dtype=np.int64).copy()
        keep = np.zeros(ids.shape[0], dtype=bool)
        for a, b in _segments(ids.shape[0], seq_lengths):
            keep[a:b] = self.keep_mask(ids[a:b])
        out[~keep] = IGNORE_INDEX
        return out.tolist()

    def mask_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Masks a collated batch in place: ``labels`` (built from ``input_ids`` / ``attention_mask`` when absent),
        shape ``(batch, seq)``; padding-free rows are split where ``position_ids == 0``."""
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        ids_np = input_ids.detach().cpu().numpy()
        position_ids = batch.get("position_ids")
        keep = np.zeros(ids_np.shape, dtype=bool)
        for row in range(ids_np.shape[0]):
            if position_ids is not None:
                starts = torch.nonzero(position_ids[row] == 0).flatten().tolist()
                bounds = list(zip(starts, starts[1:] + [ids_np.shape[1]])) or [(0, ids_np.shape[1])]
            else:
                bounds = [(0, ids_np.shape[1])]
            for a, b in bounds:
                keep[row, a:b] = self.keep_mask(ids_np[row, a:b])
        keep_t = torch.from_numpy(keep).to(labels.device)
        batch["labels"] = labels.masked_fill(~keep_t, IGNORE_INDEX)
        return batch


def _segments(length: int, seq_lengths: Sequence[int] | None) -> list[tuple[int, int]]:
    if not seq_lengths:
        return [(0, length)]
    bounds = [0, *itertools.accumulate(int(x) for x in seq_lengths)]
    segs = [(a, min(b, length)) for a, b in zip(bounds, bounds[1:]) if a < length]
    if bounds[-1] < length:
        segs.append((bounds[-1], length))
    return segs


def _explain(markers: TurnMarkers, tokenizer, sample_ids: Sequence[int], what: str) -> str:
    text = tokenizer.decode(list(sample_ids), skip_special_tokens=False)
    shown = text if len(text) <= 800 else text[:800] + " …"
    return (
        f"train_on_responses_only: {what}, so training would learn nothing.\n"
        f"Turn markers (from the {markers.source}):\n{markers.describe(sample_ids)}\n"
        f"Decoded sample ({len(sample_ids)} tokens):\n  {shown!r}\n"
        "Fix: pass the exact text that starts a user turn and an assistant turn in the sample above, e.g. "
        "train_on_responses_only(trainer, instruction_part='<user turn start>', "
        "response_part='<assistant turn start>'). If the markers are right, the replies may have been cut off: "
        "raise SFTConfig(max_length=...).")


def _all_masked_error(markers: TurnMarkers, tokenizer, batch: dict[str, Any]) -> ResponseMaskingError:
    ids = batch["input_ids"][0]
    if "attention_mask" in batch:
        ids = ids[batch["attention_mask"][0].bool()]
    return ResponseMaskingError(_explain(markers, tokenizer, ids.tolist(), "every label in a batch is -100"))


# ----------------------------------------------------------------------------------------------------------------
# trainer glue


class ResponseOnlyCollator:
    """Wraps a data collator: masks each collated batch to the replies and raises `ResponseMaskingError` when no
    label is left. Other attributes are read from the wrapped collator."""

    def __init__(self, collator, masker: ResponseMasker, tokenizer):
        self.collator = collator
        self.masker = masker
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.masker.mask_batch(self.collator(features))
        if not bool((batch["labels"] != IGNORE_INDEX).any()):
            raise _all_masked_error(self.masker.markers, self.tokenizer, batch)
        return batch

    def __getattr__(self, name: str):
        if name in ("collator", "masker", "tokenizer") or "collator" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["collator"], name)


def _mask_examples(batch: dict[str, list], masker: ResponseMasker) -> dict[str, list]:
    seq_lengths = batch.get("seq_lengths")
    labels = batch.get("labels")
    return {"labels": [masker.mask_labels(ids, None if labels is None else labels[i],
                                          None if seq_lengths is None else seq_lengths[i])
                       for i, ids in enumerate(batch["input_ids"])]}


def _has_trained_token(example: dict[str, Any]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])


def _mask_dataset(dataset, masker: ResponseMasker, tokenizer, name: str, num_proc: int | None):
    """Masks the ``labels`` column of a tokenized dataset and drops examples left with no trained token."""
    if dataset is None:
        return None
    columns = getattr(dataset, "column_names", None)
    if columns is None and hasattr(dataset, "map"):  # an IterableDataset after map() may not know its columns
        columns = list(next(iter(dataset), {}))
    if not columns or "input_ids" not in columns or not hasattr(dataset, "map"):
        logger.info("train_on_responses_only: the %s dataset is not tokenized; its batches are masked by the "
                    "collator only", name)
        return dataset
    is_map_style = hasattr(dataset, "__len__") and hasattr(dataset, "select")
    kwargs = {}
    if is_map_style:  # IterableDataset.map takes neither num_proc nor desc
        kwargs = {"num_proc": num_proc, "desc": f"Masking non-assistant tokens in the {name} dataset"}
    masked = dataset.map(_mask_examples, batched=True, fn_kwargs={"masker": masker}, **kwargs)
    if not is_map_style:
        return masked.filter(_has_trained_token)
    kwargs["desc"] = f"Dropping {name} examples with no assistant tokens"
    kept = masked.filter(_has_trained_token, **kwargs)
    if len(masked) and not len(kept):
        raise ResponseMaskingError(_explain(masker.markers, tokenizer, masked[0]["input_ids"],
                                            f"every label of all {len(masked)} {name} examples is -100"))
    if len(kept) < len(masked):
        logger.warning("train_on_responses_only: dropped %d of %d %s examples with no assistant token left to train "
                       "on (reply cut off by max_length, or no %r in the example)",
                       len(masked) - len(kept), len(masked), name, masker.markers.response)
    return kept


def check_first_batches(trainer, num_batches: int = CHECK_BATCHES) -> None:
    """Collates the first `num_batches` training batches (in dataset order) with ``trainer.data_collator`` and
    raises `ResponseMaskingError` if one of them has every label at -100. The dataloader is not touched."""
    dataset, collator = trainer.train_dataset, trainer.data_collator
    masker = getattr(collator, "masker", None)
    if dataset is None or collator is None or masker is None:
        return
    batch_size = max(1, int(getattr(trainer.args, "per_device_train_batch_size", 1)))
    wanted = num_batches * batch_size
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        rows = [dataset[i] for i in range(min(len(dataset), wanted))]
    else:
        rows = list(itertools.islice(iter(dataset), wanted))
    if getattr(trainer.args, "remove_unused_columns", True):
        rows = [{k: v for k, v in row.items() if k in _COLLATOR_COLUMNS} for row in rows]
    if rows and "input_ids" not in rows[0]:
        return  # untokenized rows (vision/skip_prepare): the collator checks each batch during training
    for start in range(0, len(rows), batch_size):
        collator(rows[start:start + batch_size])  # the wrapper raises on an all-masked batch


class ResponseMaskCheckCallback(TrainerCallback):
    """Re-checks the first batches when training begins (the dataset or collator may have been replaced)."""

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            check_first_batches(trainer)


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            num_proc: int | None = None):
    """Masks every label outside assistant replies to -100 on a built TRL ``SFTTrainer`` and returns the trainer.

    instruction_part / response_part: the exact text that starts a user / an assistant turn (e.g.
    ``"<|im_start|>user\\n"``, ``"<|im_start|>assistant\\n"``); detected from the chat template when None.
    num_proc: worker processes for masking the datasets (``Dataset.map``).

    Multi-turn: every assistant reply is trained (with its end-of-turn tokens), every system/user turn is masked.
    Raises `ResponseMaskingError` (markers, token ids, decoded sample, fix) when a batch would have no label left.
    """
    processing_class = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if processing_class is None:
        raise ResponseMaskingError("train_on_responses_only needs the trainer's tokenizer, but "
                                   "trainer.processing_class is None. Fix: build the trainer with "
                                   "processing_class=tokenizer.")
    tokenizer = _tokenizer_of(processing_class)
    markers = resolve_turn_markers(tokenizer, instruction_part, response_part)
    masker = ResponseMasker(markers)
    logger.info("train_on_responses_only: markers from the %s:\n%s", markers.source, markers.describe())

    trainer.train_dataset = _mask_dataset(trainer.train_dataset, masker, tokenizer, "train", num_proc)
    eval_dataset = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_dataset, dict):
        trainer.eval_dataset = {k: _mask_dataset(v, masker, tokenizer, f"eval[{k}]", num_proc)
                                for k, v in eval_dataset.items()}
    elif eval_dataset is not None:
        trainer.eval_dataset = _mask_dataset(eval_dataset, masker, tokenizer, "eval", num_proc)

    collator = trainer.data_collator
    if isinstance(collator, ResponseOnlyCollator):
        collator = collator.collator
    trainer.data_collator = ResponseOnlyCollator(collator, masker, tokenizer)

    check_first_batches(trainer)
    handler = trainer.callback_handler
    if not any(isinstance(cb, ResponseMaskCheckCallback) for cb in handler.callbacks):
        trainer.add_callback(ResponseMaskCheckCallback(trainer))
    return trainer
