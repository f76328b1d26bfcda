"""Silence messages from dependencies that a fastlm user can do nothing about, narrowly (one message each).

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." at import on CPUs with
  AVX512-BF16 when the optional `kernels` package (a hub download) is missing; its own CPU kernel is used instead.
- transformers >= 5.18 warns that `TrainingArguments(gradient_checkpointing=...)` is deprecated; TRL's configs set
  that field by default, so every `SFTConfig(...)` warns although the user never wrote it.

Warnings that our own calls would trigger are fixed at the call instead of filtered here.
"""
from __future__ import annotations

import logging
import warnings

_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_installed = False


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_noise() -> None:
    """Install the filters once (idempotent). Called by `from_pretrained` and the `fastlm` command."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger(_BNB_LOGGER).addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
        warnings.filterwarnings("ignore", message=rf"`{old}` is deprecated and will be removed in v6",
                                category=FutureWarning, module=r"transformers\.training_args")
