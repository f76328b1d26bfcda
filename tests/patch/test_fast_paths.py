"""Every registered family with fastlm's fast paths installed trains like plain transformers + PEFT: one step's
loss and gradients match (torch reference ops, and the Triton kernels under the interpreter), 20 steps of
training track the plain run within 1% per step, and `fastlm.patch.remove` gives back bit-identical outputs."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fastlm import FastLanguageModel, patch
from fastlm.kernels import _triton
from fixtures.tiny import FAMILY_MODEL_TYPES

FAST = {"fast_norms", "fast_lora", "fast_attention", "fused_loss"}


def _pair(path):
    """(fastlm LoRA model, plain HF + PEFT model) with identical weights and LoRA init."""
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True, dtype=torch.float32,
                                                 max_seq_length=256, use_gradient_checkpointing=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                             use_gradient_checkpointing=False)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(model.device)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                               if hasattr(m, "lora_A")}))
    plain = get_peft_model(plain, config)
    plain.load_state_dict(model.state_dict())
    assert FAST <= set(patch.patch_set(model).names)
    return model, plain


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _on(model, batch):
    return {k: v.to(model.device) for k, v in batch.items()}


def _loss_grads(model, batch):
    model.zero_grad()
    loss = model(**_on(model, batch)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_one_step_matches_plain_peft(tiny_model_factory, model_type, kernels):
    model, plain = _pair(tiny_model_factory(model_type))
    batch = _batch()
    if kernels == "triton":
        with _triton.force_triton():
            loss, grads = _loss_grads(model, batch)
    else:
        loss, grads = _loss_grads(model, batch)
    ref_loss, ref_grads = _loss_grads(plain, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_twenty_steps_track_plain_peft_and_remove_restores_it(tiny_model_factory, model_type):
    model, plain = _pair(tiny_model_factory(model_type))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3) for m in (model, plain)]
    for step in range(20):
        batch = _batch(step)
        losses = []
        for m, opt in zip((model, plain), opts):
            loss = m(**_on(m, batch)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 0.01 * abs(losses[1]), (step, losses)
    for (n, p), (n2, p2) in zip(model.named_parameters(), plain.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, p2, rtol=1e-3, atol=1e-5, msg=n)

    patch.remove(model)
    plain.load_state_dict(model.state_dict())  # same weights: the outputs must then be the same bits
    model.eval(), plain.eval()
    batch = _batch(99)
    with torch.no_grad():
        assert torch.equal(model(**_on(model, batch)).logits, plain(**_on(plain, batch)).logits)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_packed_rows_attend_within_each_sequence(tiny_model_factory, model_type):
    """Padding-free batches: one row of three sequences with restarting position_ids gives the loss and gradients
    of plain transformers on the same packed row, and the per-sequence logits of each sequence alone."""
    model, plain = _pair(tiny_model_factory(model_type))
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in (7, 12, 5)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])[None]
    batch = dict(input_ids=ids, position_ids=pos, labels=labels)
    loss, grads = _loss_grads(model, batch)
    ref_loss, ref_grads = _loss_grads(plain, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        packed = model(input_ids=ids.to(model.device), position_ids=pos.to(model.device), use_cache=False).logits[0]
        start = 0
        for s in seqs:
            alone = plain(input_ids=s[None].to(plain.device)).logits[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, rtol=1e-4, atol=1e-5)
            start += len(s)
