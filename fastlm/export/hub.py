"""Uploads to the Hugging Face Hub. The export is always written and verified locally first; when the hub cannot be
reached the error says so and names the complete local directory, which can be uploaded later."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FastLMError

logger = logging.getLogger(__name__)


class HubUploadError(FastLMError, OSError):
    """The upload failed; the local export is complete."""


def upload_folder(directory, repo_id: str, token=None, private=None, commit_message=None) -> str:
    """Create `repo_id` if needed and upload `directory`; returns the commit URL."""
    import os

    directory = Path(directory)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise HubUploadError(
            f"cannot push to the Hugging Face Hub repo {repo_id!r}: HF_HUB_OFFLINE is set. The export is complete "
            f"in {str(directory)!r}. Fix: unset HF_HUB_OFFLINE where the hub is reachable, then run "
            f"`hf upload {repo_id} {directory}`.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                 commit_message=commit_message or "Upload model exported with fastlm")
    except Exception as exc:  # noqa: BLE001 - every failure gets the same guidance
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        unreachable = any(w in reason for w in ("ConnectionError", "Timeout", "resolve", "unreachable", "Offline",
                                                 "Max retries", "Name or service"))
        what = "the hub could not be reached" if unreachable else "the upload failed"
        raise HubUploadError(
            f"cannot push to the Hugging Face Hub repo {repo_id!r}: {what} ({reason}). The export is complete in "
            f"{str(directory)!r}. Fix: check the network and the token (write access to {repo_id!r}), then run "
            f"`hf upload {repo_id} {directory}`.") from exc
    url = str(getattr(info, "commit_url", info))
    logger.warning("fastlm: pushed %s to %s", directory, url)
    return url
