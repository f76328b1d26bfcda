"""Contradictions and bad inputs: clear errors, all reported at once, before any weight is read."""
import os

import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.errors import ConfigError, ModelSourceError, UnsupportedFeatureError  # noqa: F401


def _snapshot(path):
    return {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)}


def test_all_contradictions_reported_together_and_nothing_loaded(tiny_llama_dir, monkeypatch):
    import transformers

    def boom(*a, **k):  # any weight read would be a bug
        raise AssertionError("weights were read before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    before = _snapshot(tiny_llama_dir)
    with pytest.raises(ConfigError) as err:
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=True, load_in_8bit=True,
                                          full_finetuning=True, dtype="float64", max_seq_length=-5,
                                          use_gradient_checkpointing="sometimes", qat_scheme="int3",
                                          fast_inference="yes", not_an_argument=1)
    msg = str(err.value)
    for needle in ("load_in_4bit and load_in_8bit", "full_finetuning", "dtype='float64'", "max_seq_length=-5",
                   "use_gradient_checkpointing='sometimes'", "qat_scheme='int3'", "int8-int4",
                   "fast_inference='yes'", "True or False", "not_an_argument"):
        assert needle in msg, f"{needle!r} missing from:\n{msg}"
    assert len(err.value.problems) >= 8
    assert _snapshot(tiny_llama_dir) == before


def test_default_4bit_steps_aside_for_other_precisions(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_8bit=True)
    assert getattr(model, "is_loaded_in_8bit", False) and not getattr(model, "is_loaded_in_4bit", False)
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), full_finetuning=True)
    assert not getattr(model, "is_loaded_in_4bit", False)
    assert all(p.requires_grad for p in model.parameters())


def test_explicit_4bit_with_full_finetuning_is_an_error(tiny_llama_dir):
    with pytest.raises(ConfigError, match="load_in_4bit=False"):
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=True, full_finetuning=True)


def test_fp8_needs_a_recent_gpu(tiny_llama_dir):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine supports FP8; the error path is for older or missing GPUs")
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_fp8=True)


def test_vllm_only_arguments_are_not_silently_ignored(tiny_llama_dir):
    with pytest.raises(ConfigError) as err:
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), float8_kv_cache=True, max_lora_rank=128,
                                          gpu_memory_utilization=0.9)
    assert str(err.value).count("fast_inference=True") == 3


def test_positional_extras_and_offload_embedding_on_cpu(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"\*args"):
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), 2048, None, True, False, False, False, None,
                                          "sequential", None, True, False, "unsloth", None, None, False, False,
                                          None, False, 0.5, False, 3407, 64, True, None, False, False, "extra")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="offload_embedding"):
            FastLanguageModel.from_pretrained(str(tiny_llama_dir), offload_embedding=True)


def test_explicit_dtype_is_honoured(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True)
    assert model.dtype == (torch.float32 if not torch.cuda.is_available() else model.dtype)


def test_bad_model_names(tmp_path):
    with pytest.raises(ModelSourceError, match="no such directory"):
        FastLanguageModel.from_pretrained(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ModelSourceError, match="Could not find the model 'nobody/not-a-model'.*Fix"):
        FastLanguageModel.from_pretrained("nobody/not-a-model")
