"""Paths that only exist on CUDA machines. Skipped on CPU (CI has no GPU); run through scripts/gpu_check.py's
machine with `pytest tests/test_gpu_paths.py`."""
import pytest
import torch

from fastlm import FastLanguageModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")


def test_offload_embedding_keeps_the_table_on_cpu_with_identical_logits(tiny_llama_dir):
    kw = dict(load_in_16bit=True, dtype=torch.float32)
    plain, tok = FastLanguageModel.from_pretrained(str(tiny_llama_dir), **kw)
    offloaded, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), offload_embedding=True, **kw)
    assert offloaded.get_input_embeddings().weight.device.type == "cpu"
    assert offloaded.lm_head.weight.device.type == "cuda"
    batch = tok(["the cat is red"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**batch).logits, plain(**batch).logits)
    model = FastLanguageModel.get_peft_model(offloaded, r=4)
    FastLanguageModel.for_training(model)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_fp8_lora_trains(tiny_model_factory):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    pytest.importorskip("torchao")
    path = tiny_model_factory("llama", hidden_size=256, intermediate_size=512)
    model, tok = FastLanguageModel.from_pretrained(str(path), load_in_fp8=True)
    model = FastLanguageModel.get_peft_model(model, r=8)
    FastLanguageModel.for_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    batch = tok(["the cat is red and the dog is blue"], return_tensors="pt").to("cuda")
    losses = []
    for _ in range(6):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
