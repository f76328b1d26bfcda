"""fast_inference=True: without vLLM the built-in engine serves fast_generate with a notice; with vLLM, the calls
and fastlm's SamplingParams / LoRARequest are handed over in vLLM's own types (checked against a stand-in
module, since vLLM cannot be installed on CPU CI)."""
import sys
import types

import pytest

from fastlm.inference import SamplingParams
from fastlm.inference.fast_generate import LoRARequest
from fastlm.inference.vllm_backend import VLLMBackend, attach_fast_inference, vllm_available


def test_without_vllm_the_builtin_engine_serves_with_a_notice(tiny_model_factory, loaded, caplog):
    if vllm_available():
        pytest.skip("vLLM is installed here")
    model, _ = loaded(tiny_model_factory("llama"))
    with caplog.at_level("WARNING"):
        assert attach_fast_inference(model, "unused", 256) == "builtin"
    assert "vLLM is not installed; the built-in engine serves fast_generate" in caplog.text
    out = model.fast_generate("the cat", SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.fixture
def fake_vllm(monkeypatch):
    calls = {}

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw

        def generate(self, prompts, sp, lora_request=None):
            calls["generate"] = (prompts, sp, lora_request)
            return ["vllm-output"]

    class VSamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class VLoRARequest:
        def __init__(self, name, int_id, path):
            self.args = (name, int_id, path)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, VSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = VLoRARequest
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_calls_reach_vllm_in_its_own_types(fake_vllm):
    backend = VLLMBackend("/models/x", 1024, gpu_memory_utilization=0.6, max_lora_rank=32, float8_kv_cache=True)
    init = fake_vllm["init"]
    assert init["model"] == "/models/x" and init["max_model_len"] == 1024 and init["enable_lora"]
    assert init["max_lora_rank"] == 32 and init["kv_cache_dtype"] == "fp8" and init["gpu_memory_utilization"] == 0.6
    out = backend.generate(["hi"], SamplingParams(temperature=0.5, top_p=0.9, max_tokens=7, stop=["\n"]),
                           LoRARequest("ad", 3, "/adapters/ad"))
    assert out == ["vllm-output"]
    prompts, sp, lr = fake_vllm["generate"]
    assert sp.kw["temperature"] == 0.5 and sp.kw["top_p"] == 0.9 and sp.kw["max_tokens"] == 7
    assert sp.kw["stop"] == ["\n"] and "stop_strings" not in sp.kw
    assert lr.args == ("ad", 3, "/adapters/ad")
