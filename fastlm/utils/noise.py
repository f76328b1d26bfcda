"""Silence messages from dependencies that a fastlm user can do nothing about, narrowly (one message each).

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." at import on CPUs with
  AVX512-BF16 when the optional `kernels` package (a hub download) is missing; its own CPU kernel is used instead.
- transformers >= 5.18 warns that `TrainingArguments(gradient_checkpointing=...)` is deprecated; TRL's configs set
  that field by default, so every `SFTConfig(...)` warns although the user never wrote it.

- torchao builds that do not match the installed torch log "Failed to load .../torchao/_C_*.so" for each optional
  C extension, and torchao then calls a deprecated torch API that logs "... is an Enum subclass and is now natively
  supported by torch.compile"; transformers imports torchao whenever it is installed (the export extra).
- PEFT's `PeftModel.__init__` reads transformers' deprecated `is_gradient_checkpointing` (FutureWarning in
  transformers >= 5.2x); `quiet_peft_wrap()` hides that one warning only while fastlm itself wraps a model.

Warnings that our own calls would trigger are fixed at the call instead of filtered here.
"""
from __future__ import annotations

import contextlib
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


class _DropEnumNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in str(record.msg)


def silence_known_noise() -> None:
    """Install the filters once (idempotent). Called on first use of a public fastlm name, by `from_pretrained`
    and by the `fastlm` command, before transformers is imported."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger(_BNB_LOGGER).addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))
    logging.getLogger("torchao").addFilter(_DropMessage("Failed to load "))
    logging.getLogger("torch.utils._pytree").addFilter(_DropEnumNotice())
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
        warnings.filterwarnings("ignore", message=rf"`{old}` is deprecated and will be removed in v6",
                                category=FutureWarning, module=r"transformers\.training_args")


@contextlib.contextmanager
def quiet_peft_wrap():
    """Around fastlm's own calls of `peft.get_peft_model` / `PeftModel.from_pretrained`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield
