"""`attach_export_methods(model)`: bind the export methods onto a model instance (base model or PEFT wrapper)."""
from __future__ import annotations

import types


def _save_pretrained_merged(self, save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
    from .merged import save_pretrained_merged

    return save_pretrained_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)


def _push_to_hub_merged(self, repo_id, tokenizer=None, save_method="merged_16bit", token=None, private=None,
                        **kwargs):
    from .push import push_to_hub_merged

    return push_to_hub_merged(self, repo_id, tokenizer, save_method=save_method, token=token, private=private,
                              **kwargs)


def _save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="q8_0", **kwargs):
    from .gguf.export import save_pretrained_gguf

    return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)


def _push_to_hub_gguf(self, repo_id, tokenizer=None, quantization_method="q8_0", token=None, private=None,
                      **kwargs):
    from .push import push_to_hub_gguf

    return push_to_hub_gguf(self, repo_id, tokenizer, quantization_method=quantization_method, token=token,
                            private=private, **kwargs)


def _save_pretrained_torchao(self, save_directory, tokenizer=None, torchao_config=None, **kwargs):
    from .torchao import save_pretrained_torchao

    return save_pretrained_torchao(self, save_directory, tokenizer, torchao_config=torchao_config, **kwargs)


def _save_pretrained_onnx(self, save_directory, tokenizer=None, **kwargs):
    from .onnx import save_pretrained_onnx

    return save_pretrained_onnx(self, save_directory, tokenizer, **kwargs)


EXPORT_METHODS = {
    "save_pretrained_merged": _save_pretrained_merged,
    "push_to_hub_merged": _push_to_hub_merged,
    "save_pretrained_gguf": _save_pretrained_gguf,
    "push_to_hub_gguf": _push_to_hub_gguf,
    "save_pretrained_torchao": _save_pretrained_torchao,
    "save_pretrained_onnx": _save_pretrained_onnx,
}


def attach_export_methods(model) -> None:
    """Bind every export method onto this instance (call for the base model and again for its PEFT wrapper)."""
    for name, fn in EXPORT_METHODS.items():
        object.__setattr__(model, name, types.MethodType(fn, model))
