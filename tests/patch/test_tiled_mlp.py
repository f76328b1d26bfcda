"""Tiled MLP computes the same function and gradients as the plain MLP."""
import torch

from fastlm import FastLanguageModel
from fastlm.patch.tiled_mlp import install_tiled_mlp, remove_tiled_mlp


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
    assert install_tiled_mlp(model, chunk_tokens=7) == 2
    loss_tiled, grads_tiled = run()
    torch.testing.assert_close(loss_tiled, loss_ref, rtol=1e-5, atol=1e-6)
    for name in grads_ref:
        torch.testing.assert_close(grads_tiled[name], grads_ref[name], rtol=1e-4, atol=1e-6)
    remove_tiled_mlp(model)
    assert not hasattr(model.model.layers[0].mlp, "_fastlm_original_forward")


def test_from_pretrained_flag_installs_tiled_mlp(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, unsloth_tiled_mlp=True)
    assert hasattr(model.model.layers[0].mlp, "_fastlm_original_forward")
