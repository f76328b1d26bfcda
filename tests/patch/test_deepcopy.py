"""`copy.deepcopy` of a fastlm-patched model is a model of its own (TRL's online DPO / A2PO reference models, users'
frozen copies): the copy computes with its own weights, a training step on it changes only it, and
`fastlm.patch.remove` on it gives the plain model back while the original stays patched."""
import copy
import dataclasses
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastlm import FastLanguageModel, patch

peft = pytest.importorskip("peft")


def _load(path, lora: bool):
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True, dtype=torch.float32,
                                                 full_finetuning=not lora, unsloth_tiled_mlp=True, max_seq_length=128,
                                                 use_gradient_checkpointing=False)
    if lora:
        torch.manual_seed(0)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                                 use_gradient_checkpointing=False)
    # every CPU patch: also the CPU-side embedding hooks (on CPU the plan refuses the option, the patch installs)
    ps = patch.patch_set(model)
    patch.apply(model, dataclasses.replace(ps.options, offload_embedding=True))
    return model


def _plain_like(path, model):
    """A plain transformers (+ PEFT) model holding `model`'s current weights."""
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if hasattr(model, "peft_config"):
        plain = peft.get_peft_model(plain, copy.deepcopy(model.peft_config["default"]))
    plain.load_state_dict(model.state_dict())
    return plain


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loss_and_grads(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss  # grad enabled + labels: fused loss, fused LoRA, fused MLP
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _perturb(model, patterns):
    """Add noise, in place, to the first parameter whose name contains all the parts of each pattern."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parts in patterns:
            name = next(n for n in params if all(part in n for part in parts))
            params[name].add_(0.5 * torch.randn(params[name].shape, generator=gen))


def _instance_callables(model):
    """Plain functions stored on module instances (closures would keep computing with the original's modules)."""
    return [f"{name}.{key}" for name, module in model.named_modules() for key, value in module.__dict__.items()
            if isinstance(value, types.FunctionType)]


def _overrides(model):
    return sorted(f"{name}.{key}" for name, module in model.named_modules() for key in module.__dict__
                  if key == "forward" or key.startswith("_fastlm_"))


_CHANGES = {  # one LoRA B and one base weight of attention and MLP, norms, lm_head (fused loss), the embedding
    True: [("layers.0.self_attn", "lora_B"), ("layers.1.mlp", "lora_B"), ("layers.1.mlp.down_proj", "base_layer"),
           ("layers.0.self_attn", "base_layer"), ("layers.0.input_layernorm",), ("model.norm",), ("lm_head",),
           ("embed_tokens",)],
    False: [("layers.0.self_attn",), ("layers.1.mlp",), ("layers.0.post_attention_layernorm",), ("model.norm",),
            ("lm_head",), ("embed_tokens",)],
}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full_finetuning"])
@pytest.mark.parametrize("family", ["llama", "phi3"])  # phi3: fused qkv_proj and gate_up_proj
def test_deep_copy_computes_trains_and_unpatches_on_its_own(tiny_model_factory, family, lora):
    path = tiny_model_factory(family)
    model = _load(path, lora)
    names = patch.patch_set(model).names
    assert {"fast_norms", "fast_attention", "fused_loss", "tiled_mlp", "offload_embedding",
            "fast_lora" if lora else "fast_mlp"} <= set(names)
    overrides = _overrides(model)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}

    twin = copy.deepcopy(model)
    assert _instance_callables(twin) == []  # every per-instance forward is bound to the copy, none a closure
    assert patch.patch_set(twin) is not patch.patch_set(model) and patch.patch_set(twin).names == names
    assert patch.apply(twin) is patch.patch_set(twin) and patch.patch_set(twin).names == names  # no-op twice
    _perturb(twin, _CHANGES[lora])
    plain = _plain_like(path, twin)

    # the copy's logits and loss follow its own weights, the original's stay
    got = _logits(twin, ids)
    assert (got - before).abs().max() > 0.1
    torch.testing.assert_close(got, _logits(plain, ids), atol=1e-5, rtol=1e-4)
    assert torch.equal(_logits(model, ids), before)
    loss, grads = _loss_and_grads(twin, ids)
    loss_plain, grads_plain = _loss_and_grads(plain, ids)
    torch.testing.assert_close(loss, loss_plain, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_plain.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_plain[name], atol=1e-5, rtol=1e-4, msg=name)

    # a training step on the copy trains the copy (what it computes with) and nothing of the original
    trainable = [p for p in twin.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    twin.train()
    twin(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    opt.zero_grad(set_to_none=True)
    stepped = _logits(twin, ids)
    assert (stepped - got).abs().max() > 1e-3
    plain.load_state_dict(twin.state_dict())
    torch.testing.assert_close(stepped, _logits(plain, ids), atol=1e-5, rtol=1e-4)
    assert torch.equal(_logits(model, ids), before)
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())

    # unpatching the copy gives the plain model and leaves the original patched
    assert patch.remove(twin) == names[::-1]
    left = _overrides(twin)
    assert not [n for n in left if n.endswith(".forward") or n.startswith("forward")]
    assert torch.equal(_logits(twin, ids), _logits(plain, ids))
    assert patch.patch_set(model).names == names and _overrides(model) == overrides
    assert torch.equal(_logits(model, ids), before)
    patch.remove(model)  # and the original's own undo still restores the original
    assert _overrides(model) == left
    assert torch.equal(_logits(model, ids), _logits(_plain_like(path, model), ids))
