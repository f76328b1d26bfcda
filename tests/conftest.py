import os
import sys
from pathlib import Path

# OpenMP threads that wait passively: on a shared or loaded machine, spinning torch threads slow CPU training down
# by an order of magnitude (measured: 4 LoRA steps of SmolLM2-135M took 197 s with the default policy and 26 s with
# PASSIVE on a loaded 2-core machine). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors through the interpreter; it must be on before any kernel module is imported.
# On a GPU machine the kernels compile for the GPU as usual.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fixtures.tiny import build_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Returns a function model_type -> directory of a saved tiny random model (built once per type)."""
    made: dict[tuple, Path] = {}
    tok = build_tokenizer()

    def make(model_type: str = "llama", **overrides) -> Path:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = save_tiny_model(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"), tokenizer=tok,
                                        **overrides)
        return made[key]

    return make


@pytest.fixture
def tiny_llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts of fastlm's offloaded checkpoint function and of transformers' plain one, counted at the source:
    `OffloadedCheckpointFunction.apply` and the `checkpoint` that transformers' enable wraps in a partial."""
    import transformers.modeling_utils as hf_modeling

    from fastlm.patch.offload_checkpointing import OffloadedCheckpointFunction

    counts = {"offloaded": 0, "plain": 0}
    apply, plain = OffloadedCheckpointFunction.apply, hf_modeling.checkpoint

    def counting_apply(*args):
        counts["offloaded"] += 1
        return apply(*args)

    def counting_plain(*args, **kwargs):
        counts["plain"] += 1
        return plain(*args, **kwargs)

    monkeypatch.setattr(OffloadedCheckpointFunction, "apply", staticmethod(counting_apply))
    monkeypatch.setattr(hf_modeling, "checkpoint", counting_plain)
    return counts
