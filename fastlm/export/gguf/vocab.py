"""The tokenizer in GGUF: byte-level BPE vocabulary, token types, merges, pre-tokenizer name, special token ids,
add-BOS/EOS flags and the chat template, read from the HF fast tokenizer's `tokenizer.json`. SentencePiece-style
tokenizers (byte-fallback BPE with ▁ for spaces) are written by vocab_spm.py.

llama.cpp picks its pre-tokenizer regex by name (`tokenizer.ggml.pre`); the name is chosen here from the
tokenizer's own pre-tokenizer pattern, and the GGUF check compares llama.cpp's tokenization with the HF one.
"""
from __future__ import annotations

import json

from ...errors import UnsupportedFeatureError
from ..model_files import end_of_turn_token

# llama.cpp pre-tokenizer names for the split patterns HF tokenizers use
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
SPLIT_PATTERNS = {_GPT2: "gpt-2", _LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UnsupportedFeatureError(
            f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}. Fix: load the "
            "tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True).")
    return json.loads(backend.to_str())


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or an error naming what was found."""
    pre = tj.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            pattern = steps[0].get("pattern", {}).get("Regex")
            if pattern in SPLIT_PATTERNS:
                return SPLIT_PATTERNS[pattern]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return "smollm"
    raise UnsupportedFeatureError(
        f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:300]}) has no known llama.cpp equivalent, "
        "so llama.cpp would split text differently. Supported: byte-level BPE with the GPT-2, Llama-3, Qwen2 or "
        "SmolLM patterns. Fix: export with save_pretrained_merged and convert with llama.cpp's tools.")


def _special_flags(tokenizer) -> tuple[bool, bool]:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id
    return add_bos, add_eos


def chat_template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template


def _check_size(tokenizer, n_vocab: int) -> None:
    if len(tokenizer) > n_vocab:
        raise UnsupportedFeatureError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {n_vocab}. Fix: resize the "
            "model's embeddings (model.resize_token_embeddings(len(tokenizer))) before exporting.")


def write_specials(writer, tokenizer) -> None:
    """Special token ids, end-of-turn token, add-BOS/EOS flags and the chat template."""
    for add, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                     (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            add(int(tid))
    eot = end_of_turn_token(tokenizer)
    if eot is not None and eot[0] != tokenizer.eos_token_id:
        writer.add_eot_token_id(int(eot[0]))
    add_bos, add_eos = _special_flags(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = chat_template_of(tokenizer)
    if template:
        writer.add_chat_template(template)


def write_vocab(writer, tokenizer, config) -> None:
    import gguf

    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    if model.get("byte_fallback") or model.get("type") == "Unigram":
        from .vocab_spm import write_spm_vocab

        _check_size(tokenizer, int(config.vocab_size))
        write_spm_vocab(writer, tokenizer, tj, int(config.vocab_size))
        write_specials(writer, tokenizer)
        return
    if model.get("type") != "BPE":
        raise UnsupportedFeatureError(
            f"GGUF export supports byte-level BPE and SentencePiece-style (byte-fallback BPE) tokenizers; this one "
            f"is {model.get('type')}. Fix: export with save_pretrained_merged and convert with llama.cpp's "
            "convert_hf_to_gguf.py.")
    pre = pre_tokenizer_name(tj)
    n_vocab = int(config.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, idx in model["vocab"].items():
        if idx < n_vocab:
            tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
    for added in tj.get("added_tokens", []):
        idx = added["id"]
        if idx < n_vocab:
            tokens[idx] = added["content"]
            types[idx] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    _check_size(tokenizer, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    write_specials(writer, tokenizer)
