"""Tokenizer repairs applied by `fix_tokenizer=True`.

- A pad token that is not EOS: padding with EOS teaches a model never to stop (its label gets masked as padding).
  An existing pad/reserved token is reused (or `unk` when distinct from EOS); otherwise `<|PAD_TOKEN|>` is added
  and the caller resizes the embedding.
- A chat template whose `add_generation_prompt=True` adds the assistant header (some templates ignore the flag).
- `padding_side="right"` for training (`for_inference` switches it to left).
"""
from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

NEW_PAD_TOKEN = "<|PAD_TOKEN|>"
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|padding|>",
                   "<|vision_pad|>", "<|fim_pad|>")
_RESERVED = re.compile(r"^<\|?(reserved|unused)[_a-z]*\d*\|?>$|^<unused\d+>$", re.IGNORECASE)
_SENTINEL_USER, _SENTINEL_ASSISTANT = "FASTLM_USER_7f3a", "FASTLM_ASSISTANT_9c1e"


def _token_id(tokenizer, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def choose_pad_token(tokenizer) -> tuple[str, bool]:
    """The token to pad with and whether it must be added to the vocabulary."""
    eos = tokenizer.eos_token
    for cand in _PAD_CANDIDATES:
        if cand != eos and _token_id(tokenizer, cand) is not None:
            return cand, False
    reserved = sorted((tok for tok in tokenizer.get_vocab() if _RESERVED.match(tok)), key=tokenizer.convert_tokens_to_ids)
    if reserved:
        return reserved[-1], False
    if tokenizer.unk_token is not None and tokenizer.unk_token != eos:
        return tokenizer.unk_token, False
    return NEW_PAD_TOKEN, True


def generation_prompt_of(tokenizer) -> str | None:
    """The text a template puts before an assistant reply (the generation prompt), found by rendering."""
    user = [{"role": "user", "content": _SENTINEL_USER}]
    both = user + [{"role": "assistant", "content": _SENTINEL_ASSISTANT}]
    try:
        only_user = tokenizer.apply_chat_template(user, tokenize=False)
        full = tokenizer.apply_chat_template(both, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render has no generation prompt
        return None
    if not full.startswith(only_user) or _SENTINEL_ASSISTANT not in full:
        return None
    return full[len(only_user):full.index(_SENTINEL_ASSISTANT)]


def repair_generation_prompt(tokenizer) -> bool:
    """Make `add_generation_prompt=True` append the assistant header when the template ignores it."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return False
    user = [{"role": "user", "content": _SENTINEL_USER}]
    try:
        with_prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=False)
    except Exception:  # noqa: BLE001
        return False
    if with_prompt != without:
        return False
    header = generation_prompt_of(tokenizer)
    if not header:
        return False
    escaped = header.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    tokenizer.chat_template = template + "{% if add_generation_prompt %}{{ '" + escaped + "' }}{% endif %}"
    logger.warning("fastlm: the chat template ignored add_generation_prompt; it now appends %r", header)
    return True


def fix_tokenizer(tokenizer, max_seq_length: int | None = None) -> list[str]:
    """Apply the repairs in place. Returns the tokens added to the vocabulary (the model must be resized)."""
    added: list[str] = []
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        pad, is_new = choose_pad_token(tokenizer)
        if is_new:
            tokenizer.add_special_tokens({"pad_token": pad})
            added.append(pad)
        else:
            tokenizer.pad_token = pad
        logger.info("fastlm: pad token set to %r (was %r)", pad, tokenizer.eos_token)
    repair_generation_prompt(tokenizer)
    tokenizer.padding_side = "right"
    if max_seq_length and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10 ** 8):
        tokenizer.model_max_length = max_seq_length
    return added
