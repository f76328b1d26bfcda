"""Tiled MLP computes the same function and gradients as the plain MLP."""
import torch

from fastlm import FastLanguageModel
from fastlm import patch
from fastlm.patch.tiled_mlp import install_tiled_mlp


def test_tiled_mlp_matches_plain_forward_and_backward(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, full_finetuning=True,
                                                 dtype=torch.float32, use_gradient_checkpointing=False)
    ids = torch.randint(0, 300, (2, 40), device=model.device)

    def run():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "mlp" in n}

    loss_ref, grads_ref = run()
    before = [layer.mlp.__dict__.get("forward") for layer in model.model.layers]  # fast_mlp's forwards
    undo = install_tiled_mlp(model, chunk_tokens=7)
    assert [layer.mlp.__dict__.get("forward") for layer in model.model.layers] != before
    loss_tiled, grads_tiled = run()
    torch.testing.assert_close(loss_tiled, loss_ref, rtol=1e-5, atol=1e-6)
    for name in grads_ref:
        torch.testing.assert_close(grads_tiled[name], grads_ref[name], rtol=1e-4, atol=1e-6)
    undo()
    assert [layer.mlp.__dict__.get("forward") for layer in model.model.layers] == before


def test_from_pretrained_flag_installs_tiled_mlp_and_it_survives_lora(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, unsloth_tiled_mlp=True)
    assert "tiled_mlp" in patch.patch_set(model)
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert "tiled_mlp" in patch.patch_set(model)
    assert all("forward" in layer.mlp.__dict__ for layer in model.get_base_model().model.layers)
