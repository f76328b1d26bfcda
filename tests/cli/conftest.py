"""Fixtures of the CLI tests. Every test runs torch with one thread: on a shared 2-core CI machine two spinning
OpenMP threads per process can slow training down by an order of magnitude (subprocesses get OMP_NUM_THREADS=1)."""
from __future__ import annotations

from pathlib import Path

import pytest

from _cli_helpers import write_config


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_adapter(tiny_model_factory, tmp_path_factory) -> Path:
    """Output directory of a short `train_from_config` run on the tiny llama: a saved LoRA adapter + tokenizer."""
    from fastlm.jobs.train import train_from_config

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("adapter")
        cfg = write_config(root / "c.yaml", tiny_model_factory("llama"), root / "out",
                           training={"max_steps": 4, "save_steps": 4})
        return train_from_config(cfg, verbose=False).output_dir
    finally:
        torch.set_num_threads(before)
