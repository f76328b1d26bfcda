"""fastlm: fast, memory-light fine-tuning and inference on the Hugging Face stack, with Unsloth's API."""
from .api import FastLanguageModel, FastModel
from .inference.thinking import parse_thinking_response
from .utils.memory import cleanup_memory, gpu_memory_used, is_bf16_supported

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "FastModel", "cleanup_memory", "gpu_memory_used", "is_bf16_supported",
           "parse_thinking_response"]
