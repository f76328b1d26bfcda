"""fastlm: fast, memory-light fine-tuning and inference on the Hugging Face stack, with Unsloth's API."""
from .api import FastLanguageModel, FastModel
from .inference.thinking import parse_thinking_response
from .training import (apply_chat_template, fix_untrained_tokens, get_chat_template, standardize_data_formats,
                       to_sharegpt, train_on_responses_only)
from .utils.memory import cleanup_memory, gpu_memory_used, is_bf16_supported

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "FastModel", "apply_chat_template", "cleanup_memory", "fix_untrained_tokens",
           "get_chat_template", "gpu_memory_used", "is_bf16_supported", "parse_thinking_response",
           "standardize_data_formats", "to_sharegpt", "train_on_responses_only"]
