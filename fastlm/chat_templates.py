"""Unsloth-compatible import location: `from fastlm.chat_templates import get_chat_template, train_on_responses_only`."""
from .training.chat_templates import CHAT_TEMPLATES, get_chat_template, template_markers
from .training.data_formats import apply_chat_template, standardize_data_formats, to_sharegpt
from .training.response_masking import train_on_responses_only

__all__ = ["CHAT_TEMPLATES", "apply_chat_template", "get_chat_template", "standardize_data_formats",
           "template_markers", "to_sharegpt", "train_on_responses_only"]
