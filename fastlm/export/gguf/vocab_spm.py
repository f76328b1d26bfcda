"""SentencePiece-style tokenizers (Llama-2, Mistral, Gemma: byte-fallback BPE, spaces as ▁) as llama.cpp's "llama"
tokenizer model: tokens, scores, token types (byte tokens `<0xXX>`, control, user-defined, unknown) and whether a
▁ is prepended to the text.

llama.cpp's "llama" tokenizer repeatedly merges the adjacent pair whose concatenation is the highest-scored vocabulary
token (SentencePiece BPE), then spells what is left in byte tokens. A token made by the r-th HF merge gets score -r,
so the merge order is the score order, as in the SentencePiece model the HF tokenizer was converted from.
"""
from __future__ import annotations

import json
import re

from ...errors import UnsupportedFeatureError

SPACE = "\u2581"
_BYTE = re.compile(r"^<0x[0-9A-F]{2}>$")
_FIX = "Fix: export with save_pretrained_merged and convert with llama.cpp's convert_hf_to_gguf.py."


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for sub in node.get("normalizers", node.get("pretokenizers", [])) for s in _steps(sub)]
    return [node]


def _is_space_to_meta(step: dict) -> bool:
    kind = step.get("type")
    if kind == "Replace":
        return step.get("pattern", {}).get("String") == " " and step.get("content") == SPACE
    if kind == "Prepend":
        return step.get("prepend") == SPACE
    if kind == "Metaspace":
        return step.get("replacement") == SPACE
    # Gemma: split on a literal space after spaces became ▁ (never matches), a no-op
    return kind == "Split" and step.get("pattern", {}).get("String") == " "


def check_spm_style(tj: dict) -> None:
    """Raise unless the tokenizer is byte-fallback BPE whose only text processing is spaces -> ▁ (and a leading
    ▁), which is what llama.cpp's "llama" tokenizer does."""
    model = tj.get("model", {})
    if model.get("type") == "Unigram":
        raise UnsupportedFeatureError(
            "GGUF export: Unigram (T5 / ALBERT style) SentencePiece tokenizers are not supported; llama.cpp's "
            f"'llama' tokenizer merges by score and would split text differently. {_FIX}")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UnsupportedFeatureError(f"GGUF export: expected a byte-fallback BPE tokenizer, got {model.get('type')}.")
    odd = [s for s in _steps(tj.get("normalizer")) + _steps(tj.get("pre_tokenizer")) if not _is_space_to_meta(s)]
    if odd:
        raise UnsupportedFeatureError(
            f"GGUF export: this SentencePiece-style tokenizer also does {json.dumps(odd)[:300]}, which llama.cpp's "
            f"'llama' tokenizer does not. {_FIX}")


def adds_space_prefix(tokenizer) -> bool:
    """Whether the tokenizer prepends ▁ to a text (Llama-2 / Mistral do, Gemma does not)."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith(SPACE)


def spm_tokens(tj: dict, n_vocab: int, unk_id: int | None):
    """(tokens, scores, token types) of a byte-fallback BPE tokenizer.json, padded to `n_vocab`."""
    import gguf

    T = gguf.TokenType
    model = tj["model"]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [T.UNUSED] * n_vocab
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    unreached = -float(len(merges))  # tokens no merge makes: below every merged token
    scores = [unreached] * n_vocab
    for text, idx in vocab.items():
        if idx >= n_vocab:
            continue
        tokens[idx] = text
        scores[idx] = -float(rank[text]) if text in rank else (0.0 if len(text) == 1 else unreached - idx)
        types[idx] = T.BYTE if _BYTE.match(text) else T.NORMAL
    for added in tj.get("added_tokens", []):
        idx = added["id"]
        if idx < n_vocab and not _BYTE.match(added["content"]):
            tokens[idx] = added["content"]
            types[idx] = T.CONTROL if added.get("special") else T.USER_DEFINED
            scores[idx] = 0.0
    if unk_id is not None and unk_id < n_vocab:
        types[unk_id] = T.UNKNOWN
    missing = [f"<0x{b:02X}>" for b in range(256) if vocab.get(f"<0x{b:02X}>") is None]
    if missing:
        raise UnsupportedFeatureError(
            f"GGUF export: the byte-fallback tokenizer lacks byte tokens {missing[:4]}... ({len(missing)} of 256); "
            f"llama.cpp needs all of <0x00>..<0xFF>. {_FIX}")
    return tokens, scores, types


def write_spm_vocab(writer, tokenizer, tj: dict, n_vocab: int) -> None:
    check_spm_style(tj)
    tokens, scores, types = spm_tokens(tj, n_vocab, tokenizer.unk_token_id)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_add_space_prefix(adds_space_prefix(tokenizer))
