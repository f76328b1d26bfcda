"""fast_mlp: full fine-tuning computes every registered family's MLP with fastlm's SwiGLU / GeGLU kernel (Triton
under the interpreter, or the torch reference) and trains exactly like plain transformers: one step's loss and
every gradient match; `patch.remove` gives back bit-identical logits; applying twice changes nothing; LoRA MLPs
keep fused LoRA (fast_mlp takes only the MLPs fused LoRA left)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastlm import FastLanguageModel, patch
from fastlm.kernels import _triton, activations
from fastlm.patch import fast_lora, fast_mlp
from fixtures.tiny import FAMILY_MODEL_TYPES


def _full(path):
    """(fastlm full fine-tuning model, plain transformers model) with identical weights."""
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True, full_finetuning=True,
                                                 dtype=torch.float32, max_seq_length=256,
                                                 use_gradient_checkpointing=False)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(model.device)
    plain.load_state_dict(model.state_dict())
    return model, plain


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _loss_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mlps(model):
    return [m for n, m in model.named_modules() if n.endswith(".mlp")]


class _Count:
    """Counts the calls of a function while forwarding them."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_full_finetuning_step_matches_plain_and_remove_restores_it(tiny_model_factory, model_type, kernels,
                                                                   monkeypatch):
    model, plain = _full(tiny_model_factory(model_type))
    assert "fast_mlp" in patch.patch_set(model)
    assert all("forward" in m.__dict__ for m in _mlps(model)) and len(_mlps(model)) == 2
    # the activation really runs through fastlm's kernel module: the Triton autograd Function or the reference
    if kernels == "triton":
        spy = _Count(activations.GatedActivationFunction.apply)
        monkeypatch.setattr(activations.GatedActivationFunction, "apply", spy)
        with _triton.force_triton():
            loss, grads = _loss_grads(model, _batch())
    else:
        name = "swiglu_reference" if model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3") else \
            "geglu_reference"
        spy = _Count(getattr(activations, name))
        monkeypatch.setattr(activations, name, spy)
        loss, grads = _loss_grads(model, _batch())
    assert spy.calls == 2  # one per decoder layer
    ref_loss, ref_grads = _loss_grads(plain, _batch())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(plain.parameters()))
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)

    patch.remove(model)
    assert not any("forward" in m.__dict__ for m in _mlps(model))
    model.eval(), plain.eval()
    with torch.no_grad():
        batch = _batch(7)
        assert torch.equal(model(**batch).logits, plain(**batch).logits)


def test_apply_twice_is_a_no_op(tiny_llama_dir):
    model, _ = _full(tiny_llama_dir)
    ps = patch.patch_set(model)
    names, forwards = list(ps.names), [m.__dict__["forward"] for m in _mlps(model)]
    assert "fast_mlp" in names
    assert patch.apply(model) is ps and ps.names == names
    assert [m.__dict__["forward"] for m in _mlps(model)] == forwards
    assert fast_mlp.install_fast_mlp(model, ps.arch) is None  # every MLP is taken already


def test_lora_mlps_keep_fused_lora(tiny_llama_dir, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, dtype=torch.float32,
                                                 use_gradient_checkpointing=False)
    assert "fast_mlp" in patch.patch_set(model)  # the base model's MLPs, until LoRA arrives
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert "fast_mlp" not in patch.patch_set(model) and "fast_lora" in patch.patch_set(model)
    fused, ours = _Count(fast_lora.fused_lora_mlp), _Count(fast_mlp.gated)
    monkeypatch.setattr(fast_lora, "fused_lora_mlp", fused)
    monkeypatch.setattr(fast_mlp, "gated", ours)
    model(**_batch()).loss.backward()
    assert fused.calls == 2 and ours.calls == 0


def test_mlps_without_lora_use_the_kernel_under_attention_only_lora(tiny_llama_dir, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, dtype=torch.float32,
                                                 use_gradient_checkpointing=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             use_gradient_checkpointing=False)
    assert "fast_mlp" in patch.patch_set(model)
    ours = _Count(fast_mlp.gated)
    monkeypatch.setattr(fast_mlp, "gated", ours)
    loss, grads = _loss_grads(model, _batch())
    assert ours.calls == 2
    patch.remove(model, {"fast_mlp"})
    ref_loss, ref_grads = _loss_grads(model, _batch())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
