"""fastlm: fast, memory-light fine-tuning and inference on the Hugging Face stack, with Unsloth's API.

The public names load on first use (PEP 562), so `import fastlm` and the `fastlm` command start without importing
torch or transformers; `from fastlm import FastLanguageModel` imports them then.
"""
from __future__ import annotations

import importlib

from .version import __version__  # noqa: F401

# public name -> (module, attribute)
_PUBLIC = {
    "FastLanguageModel": (".api", "FastLanguageModel"),
    "FastModel": (".api", "FastModel"),
    "SamplingParams": (".inference.sampling", "SamplingParams"),
    "train_from_config": (".jobs.train", "train_from_config"),
    "parse_thinking_response": (".inference.thinking", "parse_thinking_response"),
    "apply_chat_template": (".training.data_formats", "apply_chat_template"),
    "fix_untrained_tokens": (".training.untrained_tokens", "fix_untrained_tokens"),
    "get_chat_template": (".training.chat_templates", "get_chat_template"),
    "standardize_data_formats": (".training.data_formats", "standardize_data_formats"),
    "to_sharegpt": (".training.data_formats", "to_sharegpt"),
    "train_on_responses_only": (".training.response_masking", "train_on_responses_only"),
    "cleanup_memory": (".utils.memory", "cleanup_memory"),
    "gpu_memory_used": (".utils.memory", "gpu_memory_used"),
    "is_bf16_supported": (".utils.memory", "is_bf16_supported"),
    "is_bfloat16_supported": (".utils.memory", "is_bf16_supported"),  # Unsloth's name
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    from .utils.noise import silence_known_noise

    silence_known_noise()  # before transformers is first imported
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
