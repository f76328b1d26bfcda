"""The fused-loss patch: a training step's loss and gradients equal the plain model's (ignore_index, padding,
num_items_in_batch, Gemma 2's soft-cap, a trained lm_head), and the logits are real whenever anybody asks."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastlm import FastLanguageModel, patch
from fastlm.kernels import _triton


@pytest.fixture(params=["reference", "triton"])
def kernel_path(request, monkeypatch):
    """CPU runs the torch reference of the fused loss; under TRITON_INTERPRET=1 the Triton chunks run too."""
    if request.param == "triton":
        if not _triton.interpreter_on():
            pytest.skip("the Triton path of the fused loss runs on CPU only under TRITON_INTERPRET=1")
        with _triton.force_triton():
            yield request.param
    else:
        yield request.param


def _step(model, ids, labels, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_fused_loss_equals_the_plain_forward(tiny_model_factory, model_type, kernel_path):
    path = tiny_model_factory(model_type)
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True, full_finetuning=True,
                                                 dtype=torch.float32, max_seq_length=256,
                                                 use_gradient_checkpointing=False)
    assert "fused_loss" in patch.patch_set(model)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(model.device)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 17), device=model.device)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 11:] = -100
    for kw in ({}, {"num_items_in_batch": torch.tensor(40, device=model.device)}):
        out, grads = _step(model, ids, labels, **kw)
        ref, ref_grads = _step(plain, ids, labels, **kw)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
        # logits are real on every access path, and in the plain output's order
        torch.testing.assert_close(out.logits, ref.logits.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["logits"], ref.logits.detach(), rtol=1e-5, atol=1e-5)
        assert list(out.keys()) == list(ref.keys())
        torch.testing.assert_close(out[1], ref[1].detach(), rtol=1e-5, atol=1e-5)
    if model_type == "gemma2":
        assert out.logits.abs().max() <= model.config.final_logit_softcapping


def test_evaluation_and_generation_use_the_plain_forward(tiny_llama_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, max_seq_length=256)
    ids = torch.randint(3, 300, (2, 9), device=model.device)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert type(out).__name__ == "CausalLMOutputWithPast" and out.logits.shape == (2, 9, model.config.vocab_size)


def test_trained_lm_head_gets_its_gradient_through_the_fused_loss(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, dtype=torch.float32,
                                                 max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj", "lm_head"])
    ids = torch.randint(3, 300, (2, 12), device=model.device)
    out, grads = _step(model, ids, ids)
    head_grads = [n for n in grads if "lm_head" in n and "modules_to_save" in n]
    assert head_grads, sorted(grads)
    with patch_removed(model):
        ref, ref_grads = _step(model, ids, ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


class patch_removed:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.names = patch.remove(self.model, {"fused_loss"})
        assert self.names == ["fused_loss"]

    def __exit__(self, *exc):
        patch.apply(self.model)
