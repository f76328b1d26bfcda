"""Patches are a set you can take back: applying twice changes nothing, `fastlm.patch.remove` gives back the plain
transformers model (no instance attributes left, identical outputs and gradients)."""
import torch
from transformers import AutoModelForCausalLM

from fastlm import FastLanguageModel, patch


def _instance_overrides(model):
    """Every attribute set on a module instance that shadows its class (bound forwards and the like)."""
    found = []
    for name, module in model.named_modules():
        for key in ("forward", "_fastlm_fp8_forward", "_fastlm_patches"):
            if key in module.__dict__:
                found.append(f"{name}.{key}")
    return found


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_apply_twice_is_a_no_op_and_remove_gives_back_the_plain_model(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, full_finetuning=True,
                                                 dtype=torch.float32, unsloth_tiled_mlp=True, max_seq_length=256,
                                                 use_gradient_checkpointing=False)
    ps = patch.patch_set(model)
    names = list(ps.names)
    assert "tiled_mlp" in names
    assert patch.apply(model) is ps and ps.names == names
    assert _instance_overrides(model)

    assert patch.remove(model) == names[::-1]
    assert _instance_overrides(model) == []
    assert patch.patch_set(model) is None

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).to(model.device)
    ids = torch.randint(0, 300, (2, 24), device=model.device)
    loss, grads = _loss_and_grads(model, ids)
    loss_plain, grads_plain = _loss_and_grads(plain, ids)
    assert torch.equal(loss, loss_plain)
    assert grads.keys() == grads_plain.keys()
    assert all(torch.equal(grads[k], grads_plain[k]) for k in grads)


def test_patches_follow_lora_and_come_off_the_peft_model(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, unsloth_tiled_mlp=True)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    assert "tiled_mlp" in patch.patch_set(model)
    patch.remove(model)
    assert _instance_overrides(model) == []
