"""Export locally, verify, then upload: the `push_to_hub_merged` / `push_to_hub_gguf` methods."""
from __future__ import annotations

from pathlib import Path

from .hub import upload_folder


def _local_dir(repo_id: str, save_directory) -> Path:
    return Path(save_directory) if save_directory is not None else Path(repo_id.rsplit("/", 1)[-1])

def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method="merged_16bit", token=None, private=None,
                       save_directory=None, commit_message=None, **kwargs):
    """Export locally (to `save_directory`, default `./<repo name>`), verify, then upload."""
    from .merged import save_pretrained_merged

    local = _local_dir(repo_id, save_directory)
    report = save_pretrained_merged(model, local, tokenizer, save_method=save_method, **kwargs)
    upload_folder(local, repo_id, token=token, private=private, commit_message=commit_message)
    return report

def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method="q8_0", token=None, private=None,
                     save_directory=None, commit_message=None, **kwargs):
    """GGUF export locally (to `save_directory`, default `./<repo name>`), verify, then upload."""
    from .gguf.export import save_pretrained_gguf

    local = _local_dir(repo_id, save_directory)
    report = save_pretrained_gguf(model, local, tokenizer, quantization_method=quantization_method, **kwargs)
    upload_folder(local, repo_id, token=token, private=private, commit_message=commit_message)
    return report
