"""ONNX export: onnxruntime's logits match the adapter model within 1e-4, for any sequence length; the KV-cache
graph matches on prefill and on each decode step, and its cached greedy continuation is torch's."""
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("model_type,kv_cache", [("llama", True), ("qwen3", False)])
def test_onnx_parity(model_type, kv_cache, tiny_model_factory, lora_model_factory, tmp_path):
    import onnxruntime as ort

    from fastlm.export.onnx_kv import OnnxDecoder

    model, tok = lora_model_factory(tiny_model_factory(model_type))
    report = model.save_pretrained_onnx(tmp_path / "o", tok, kv_cache=kv_cache)
    assert [c["name"] for c in report["checks"]] == ["onnxruntime", "onnxruntime with past"][:1 + kv_cache]
    assert all(c["passed"] for c in report["checks"])
    print(model_type, {c["name"]: c["metrics"]["max_abs_logit_diff"] for c in report["checks"]})
    session = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = tok(["the cat and the dog are in the city of paris today", "what is two"], padding=False)["input_ids"]
    model.eval()
    for seq in ids:
        got = session.run(None, {"input_ids": np.array([seq], dtype=np.int64)})[0]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq])).logits.numpy()
        assert np.abs(got - ref).max() < 1e-4
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    assert (tmp_path / "o" / "model_with_past.onnx").exists() == kv_cache
    if not kv_cache:
        return

    # the cached graph: a 2-row prefill, then one token per step, against torch's full forward
    kv = OnnxDecoder(ort.InferenceSession(str(tmp_path / "o" / "model_with_past.onnx"),
                                          providers=["CPUExecutionProvider"]), model.config)
    rows = torch.tensor([ids[0][:12], ids[0][1:13]])
    kv.reset(batch=2)
    logits = [kv.step(rows[:, :5].numpy())] + [kv.step(rows[:, t:t + 1].numpy()) for t in range(5, 12)]
    assert kv.past[0].shape[2] == 12
    with torch.no_grad():
        ref = model(input_ids=rows).logits.numpy()
    assert np.abs(np.concatenate(logits, axis=1) - ref).max() < 1e-4

    # greedy generation with the cache = transformers' generate with its own cache
    prompt = ids[1]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12, pad_token_id=0)
    assert kv.greedy(prompt, 12) == out[0, len(prompt):].tolist()


def test_onnx_bad_kv_cache_argument(tiny_model_factory, lora_model_factory, tmp_path):
    from fastlm.errors import ConfigError

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    with pytest.raises(ConfigError, match="kv_cache"):
        model.save_pretrained_onnx(tmp_path / "o", tok, kv_cache="yes")
