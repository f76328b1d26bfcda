"""ONNX export: onnxruntime's logits match the adapter model within 1e-4, for any sequence length."""
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_onnx_parity(model_type, tiny_model_factory, lora_model_factory, tmp_path):
    import onnxruntime as ort

    model, tok = lora_model_factory(tiny_model_factory(model_type))
    report = model.save_pretrained_onnx(tmp_path / "o", tok)
    assert report["checks"][0]["passed"]
    session = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = tok(["the cat and the dog are in the city of paris today", "what is two"], padding=False)["input_ids"]
    for seq in ids:
        got = session.run(None, {"input_ids": np.array([seq], dtype=np.int64)})[0]
        model.eval()
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq])).logits.numpy()
        assert np.abs(got - ref).max() < 1e-4
    assert (tmp_path / "o" / "tokenizer.json").is_file()
