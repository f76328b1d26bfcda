"""The bad-input table of the Python API: each row is a call a new user could write. Every one raises a fastlm
error naming the bad value and the fix, before any weight is read (or, for a save, before a byte is written) —
never a traceback from transformers, PEFT or safetensors, and never a silent wrong result."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fastlm import FastLanguageModel, is_bf16_supported, is_bfloat16_supported
from fastlm.errors import ConfigError, FastLMError, ModelSourceError
from fastlm.utils.safe_write import UnsafeWriteError


def _refuse_loading(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read although the arguments are invalid")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


# (id, from_pretrained keyword arguments, fragments of the error: the value and the fix)
LOAD_ROWS = [
    ("rope-factor-zero", dict(rope_scaling={"rope_type": "linear", "factor": 0}),
     ["rope_scaling['factor']=0", ">= 1", "Fix: e.g. factor=2.0"]),
    ("rope-factor-inf", dict(rope_scaling={"rope_type": "dynamic", "factor": math.inf}),
     ["rope_scaling['factor']=inf", "finite"]),
    ("rope-missing-factor", dict(rope_scaling={"rope_type": "linear"}), ["needs the keys ['factor']",
                                                                         "Fix: add 'factor'"]),
    ("rope-unknown-type", dict(rope_scaling={"rope_type": "lineer", "factor": 2.0}),
     ["rope_scaling['rope_type']='lineer'", "linear", "yarn"]),
    ("rope-old-type-key", dict(rope_scaling={"type": "yarn"}), ["needs the keys ['factor']"]),
    ("rope-typo-key", dict(rope_scaling={"rope_type": "linear", "factr": 2.0}),
     ["needs the keys", "fix the spelling of 'factr'"]),
    ("rope-llama3-order", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                             "high_freq_factor": 1.0}), ["high_freq_factor']=1.0", "greater than"]),
    ("rope-longrope-lists", dict(rope_scaling={"rope_type": "longrope", "short_factor": [], "long_factor": [1.0]}),
     ["short_factor']=[]", "non-empty list"]),
    ("rope-not-a-dict", dict(rope_scaling=2.0), ["rope_scaling=2.0", "None or a dict"]),
    ("device-map-unknown", dict(device_map="gpu"), ["device_map='gpu'", "'auto'"]),
    ("gpu-utilization-nan", dict(gpu_memory_utilization=math.nan), ["gpu_memory_utilization=nan", "(0, 1]"]),
    ("seq-len-zero", dict(max_seq_length=0), ["max_seq_length=0", "positive integer"]),
    ("dtype-unknown", dict(dtype="float8"), ["dtype='float8'", "dtype=None"]),
]


@pytest.mark.parametrize("kwargs,fragments", [r[1:] for r in LOAD_ROWS], ids=[r[0] for r in LOAD_ROWS])
def test_from_pretrained_rejects_before_loading(kwargs, fragments, tiny_llama_dir, monkeypatch):
    _refuse_loading(monkeypatch)
    with pytest.raises(ConfigError) as info:
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", 0, {"": "cuda:0"}])
def test_gpu_device_map_on_a_cpu_machine(device_map, tiny_llama_dir, monkeypatch):
    _refuse_loading(monkeypatch)
    with pytest.raises(ConfigError) as info:
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, device_map=device_map)
    assert "needs a CUDA GPU" in str(info.value) and 'device_map="auto"' in str(info.value)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_factory):
    return FastLanguageModel.from_pretrained(str(tiny_model_factory("llama")), load_in_16bit=True,
                                             max_seq_length=64)


PEFT_ROWS = [
    ("alpha-inf", dict(lora_alpha=math.inf), ["lora_alpha=inf", "finite", "Fix: e.g. lora_alpha=16"]),
    ("alpha-nan", dict(lora_alpha=math.nan), ["lora_alpha=nan"]),
    ("dropout-nan", dict(lora_dropout=math.nan), ["lora_dropout=nan", "[0, 1)"]),
    ("alpha-pattern-nan", dict(alpha_pattern={"q_proj": math.nan}), ["alpha_pattern.q_proj=nan", "finite"]),
    ("rank-zero", dict(r=0), ["r=0", "positive integer"]),
    ("seed-not-int", dict(random_state="3407"), ["random_state='3407'", "e.g. random_state=3407"]),
    ("unknown-target", dict(target_modules=["qproj"]), ["target_modules=['qproj']", "q_proj"]),
]


@pytest.mark.parametrize("kwargs,fragments", [r[1:] for r in PEFT_ROWS], ids=[r[0] for r in PEFT_ROWS])
def test_get_peft_model_rejects(kwargs, fragments, tiny_model):
    model, _ = tiny_model
    with pytest.raises(ConfigError) as info:
        FastLanguageModel.get_peft_model(model, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_truncated_safetensors_is_named(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelSourceError) as info:
        FastLanguageModel.from_pretrained(str(broken), load_in_16bit=True)
    assert str(weights) in str(info.value) and "truncated" in str(info.value)
    assert "download or copy it again" in str(info.value)
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(ModelSourceError, match="fewer than the 8-byte header"):
        FastLanguageModel.from_pretrained(str(broken), load_in_16bit=True)


def test_adapter_whose_base_is_gone_names_adapter_config(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    gone = tmp_path / "moved-away-base"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gone)}))
    with pytest.raises(ModelSourceError) as info:
        FastLanguageModel.from_pretrained(str(adapter), load_in_16bit=True)
    text = str(info.value)
    assert str(gone) in text and str(adapter / "adapter_config.json") in text and "base_model_name_or_path" in text


@pytest.mark.parametrize("name", ["./no/such/model", "/abs/missing", "outputs_that_exist/run1", "my model dir"])
def test_local_looking_paths_get_no_hub_advice(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs_that_exist").mkdir()
    with pytest.raises(ModelSourceError) as info:
        FastLanguageModel.from_pretrained(name, load_in_16bit=True)
    text = str(info.value)
    assert "is a local path" in text and "download" not in text and "nearest existing directory" in text


def test_hub_advice_names_the_current_cli(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as info:
        FastLanguageModel.from_pretrained("someone/not-a-cached-model", load_in_16bit=True)
    assert "hf download someone/not-a-cached-model" in str(info.value)
    assert "huggingface-cli" not in str(info.value)


def test_both_bf16_names_are_exported():
    assert is_bfloat16_supported is is_bf16_supported and isinstance(is_bfloat16_supported(), bool)


# --- save_pretrained on a fastlm-loaded model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_model(tiny_model_factory):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_factory("llama")), load_in_16bit=True,
                                                   max_seq_length=64)
    return FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"]), tok


@pytest.mark.parametrize("kwargs,method", [
    (dict(save_method="merged_16bit"), "save_pretrained_merged"), (dict(save_method="lora"), "save_pretrained_merged"),
    (dict(quantization_method="q4_k_m"), "save_pretrained_gguf"),
    (dict(maximum_memory_usage=0.5), "save_pretrained_merged")])
def test_save_pretrained_rejects_arguments_it_would_ignore(kwargs, method, peft_model, tmp_path):
    model, _ = peft_model
    for target in (model, model.get_base_model()):
        with pytest.raises(ConfigError) as info:
            target.save_pretrained(tmp_path / "out", **kwargs)
        key, value = next(iter(kwargs.items()))
        assert f"{key}={value!r}" in str(info.value) and f"model.{method}(" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_save_pretrained_refuses_the_source_directory(peft_model, tiny_model_factory):
    model, _ = peft_model
    source = tiny_model_factory("llama")
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    for target in (model, model.get_base_model()):
        for where in (source, source / "adapter"):
            with pytest.raises(UnsafeWriteError, match="directory the model was loaded from"):
                target.save_pretrained(where)
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before


def test_save_pretrained_passes_other_arguments_and_keeps_other_files(peft_model, tmp_path):
    from peft import PeftModel

    model, _ = peft_model
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    model.save_pretrained(out, selected_adapters=["default"], is_main_process=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary directory was left behind"
    base, _ = FastLanguageModel.from_pretrained(str(json.loads((out / "adapter_config.json").read_text())
                                                    ["base_model_name_or_path"]), load_in_16bit=True)
    loaded = PeftModel.from_pretrained(base, str(out))
    a = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    b = dict(loaded.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert torch.equal(a, b)


def test_failed_save_leaves_the_target_untouched(peft_model, tmp_path, monkeypatch):
    model, _ = peft_model
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    before = (out / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_errors_are_fastlm_errors():
    assert issubclass(UnsafeWriteError, FastLMError) and issubclass(ConfigError, FastLMError)
