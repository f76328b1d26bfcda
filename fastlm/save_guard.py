"""`model.save_pretrained` on fastlm-loaded models: the same call as in transformers / PEFT, with three guards.

1. It never writes into the directory the model (or its adapter) was loaded from: that would overwrite the source
   model, and a directory holding both `config.json` and an adapter loads as something else afterwards.
2. It writes into a temporary directory beside the target and renames the files into place when complete (after a
   free-space check), so a crash or a full disk leaves no half-written model.
3. Arguments that transformers and PEFT would silently ignore but Unsloth users pass (`save_method=`,
   `quantization_method=`, ...) are errors naming the fastlm method that honours them.

Everything else is passed to the original `save_pretrained` unchanged. Installed per instance by
`modes.attach_methods` (on the base model and on the PEFT wrapper).
"""
from __future__ import annotations

import shutil
import types
from pathlib import Path

from .errors import ConfigError, Problem
from .utils.safe_write import check_free_space, refuse_source_dir, staged_directory

# argument -> the fastlm method that honours it
REDIRECTS = {
    "save_method": "save_pretrained_merged",
    "maximum_memory_usage": "save_pretrained_merged",
    "temporary_location": "save_pretrained_merged",
    "quantization_method": "save_pretrained_gguf",
    "quantization_type": "save_pretrained_torchao",
}


def _bytes_to_write(model) -> int:
    """About how many bytes a save writes: the adapter's weights for a PEFT model, else every weight."""
    is_peft = callable(getattr(model, "get_base_model", None))
    total = 0
    for name, param in model.named_parameters():
        if not is_peft or "lora_" in name or "modules_to_save" in name or param.requires_grad:
            total += param.numel() * param.element_size()
    return int(total * 1.1) + (1 << 20)


def _guarded_save_pretrained(self, save_directory, *args, **kwargs):
    wrong = [k for k in kwargs if k in REDIRECTS]
    if wrong:
        raise ConfigError(f"{type(self).__name__}.save_pretrained", [Problem(
            k, kwargs[k], f"save_pretrained writes the weights as they are (a LoRA adapter or the 16-bit model) "
            f"and does not take {k}", f"call model.{REDIRECTS[k]}(save_directory, tokenizer, {k}={kwargs[k]!r})")
            for k in wrong])
    target = refuse_source_dir(save_directory, self, "save_pretrained")
    if kwargs.get("push_to_hub") and not kwargs.get("repo_id"):
        kwargs["repo_id"] = Path(str(save_directory)).name  # what transformers derives from the directory name
    check_free_space(target, _bytes_to_write(self), "save_pretrained")
    original = self._fastlm_original_save_pretrained
    with staged_directory(target, "save_pretrained") as tmp:
        card = target / "README.md"
        if card.is_file():  # PEFT and transformers update an existing model card instead of replacing it
            shutil.copy2(card, tmp / "README.md")
        return original(str(tmp), *args, **kwargs)


def install_save_guard(model) -> None:
    """Bind the guarded `save_pretrained` on this instance (idempotent)."""
    if "_fastlm_original_save_pretrained" in vars(model):
        return
    original = getattr(type(model), "save_pretrained", None)
    if original is None:
        return
    object.__setattr__(model, "_fastlm_original_save_pretrained", types.MethodType(original, model))
    object.__setattr__(model, "save_pretrained", types.MethodType(_guarded_save_pretrained, model))
