"""install_fast_lora on real (tiny) PEFT models: same training, same outputs after undo, fallbacks with a notice."""
import logging

import pytest
import torch

from fastlm import FastLanguageModel, patch
from fastlm.patch.fast_lora import activation_kind, install_fast_lora, lora_o, lora_parts, lora_qkv

pytest.importorskip("peft")


def _lora_model(path, dropout=0.0, quant=False, checkpointing=True, **kw):
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_4bit=quant, load_in_16bit=not quant,
                                                 dtype=torch.float32, use_gradient_checkpointing=checkpointing,
                                                 max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=dropout,
                                             use_gradient_checkpointing=checkpointing, **kw)
    patch.remove(model)  # plain PEFT: these tests install the fused forwards themselves
    return model


def _batches(n, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 24), generator=gen) for _ in range(n)]


def _train(model, steps=20):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    batches = _batches(2)  # two batches in turn: a task the adapters can learn in 20 steps
    for step in range(steps):
        ids = batches[step % 2].to(model.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_training_matches_peft(tiny_llama_dir):
    """20 AdamW steps, fp32, gradient checkpointing: per-step loss within 1% and the same LoRA weights."""
    plain_losses, plain_weights = _train(_lora_model(tiny_llama_dir))
    model = _lora_model(tiny_llama_dir)
    undo = install_fast_lora(model)
    assert (undo.mlp_count, undo.linear_count) == (2, 8)  # 2 layers: MLPs fused whole, q/k/v/o one by one
    assert not undo.notices.said  # nothing fell back
    fused_losses, fused_weights = _train(model)
    assert plain_losses[-1] < plain_losses[0] - 0.5  # it learns
    for step, (a, b) in enumerate(zip(fused_losses, plain_losses)):
        assert abs(a - b) <= 0.01 * abs(b), (step, a, b)
    assert fused_weights.keys() == plain_weights.keys()
    for name, w in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], w, atol=2e-4, rtol=1e-3, msg=name)


def test_undo_restores_plain_peft_bit_exactly(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir, checkpointing=False)
    for name, p in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    ids = _batches(1)[0].to(model.device)
    keys = set(model.state_dict())
    plain = model(input_ids=ids).logits.detach()
    undo = install_fast_lora(model)
    assert install_fast_lora(model) is undo  # a second install does not wrap the fused forwards again
    fused = model(input_ids=ids).logits.detach()  # autograd records: the fused path runs
    with torch.no_grad():  # nothing recorded (generation): the modules' own forwards run
        assert torch.equal(model(input_ids=ids).logits, plain)
    assert set(model.state_dict()) == keys  # saving adapters is unchanged
    undo()
    after = model(input_ids=ids).logits.detach()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fused, plain)  # (the fused path did run: it sums in another order)
    assert torch.equal(after, plain)
    for module in model.modules():
        assert "forward" not in module.__dict__ and "_fastlm_lora_notices" not in module.__dict__
    assert install_fast_lora(model) is not undo  # undone: a new install is a fresh one


def test_dropout_falls_back_with_one_notice(tiny_llama_dir, caplog):
    model = _lora_model(tiny_llama_dir, dropout=0.1, checkpointing=False)
    model.eval()  # dropout off, so the outputs are comparable
    ids = _batches(1)[0].to(model.device)
    plain = model(input_ids=ids).logits
    caplog.clear()  # get_peft_model's own install said it once already; count this install's notices
    with caplog.at_level(logging.WARNING, logger="fastlm.patch.fast_lora"):
        undo = install_fast_lora(model)
        fused = model(input_ids=ids).logits
        model(input_ids=ids)
    notices = [r.getMessage() for r in caplog.records if "fused LoRA not used" in r.getMessage()]
    assert len(notices) == 1 and "lora_dropout" in notices[0], notices
    assert torch.equal(fused, plain)  # PEFT's own forward ran
    undo()


def test_disabled_adapters_run_peft(tiny_llama_dir, caplog):
    model = _lora_model(tiny_llama_dir, checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = _batches(1)[0].to(model.device)
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    install_fast_lora(model)
    with caplog.at_level(logging.WARNING, logger="fastlm.patch.fast_lora"):
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    assert torch.equal(off, base)
    assert not torch.allclose(on, base, atol=1e-3)
    assert any("adapters are disabled" in r.getMessage() for r in caplog.records)


def _hidden(model, n=5):
    torch.manual_seed(1)
    return torch.randn(2, n, model.config.hidden_size, device=model.device, requires_grad=True)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_lora_qkv_and_o_match_modules(tiny_model_factory, family):
    """lora_qkv/lora_o (for a patched attention forward) give q_proj/k_proj/v_proj/o_proj's outputs and grads;
    Phi-3's fused qkv_proj is split as Phi3Attention splits it."""
    model = _lora_model(tiny_model_factory(family), checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    attn = model.base_model.model.model.layers[0].self_attn
    hs = _hidden(model)
    if family == "phi3":
        qkv = attn.qkv_proj(hs)
        q_size = attn.config.num_attention_heads * attn.head_dim
        kv = attn.config.num_key_value_heads * attn.head_dim
        want = (qkv[..., :q_size], qkv[..., q_size:q_size + kv], qkv[..., q_size + kv:])
    else:
        want = (attn.q_proj(hs), attn.k_proj(hs), attn.v_proj(hs))
    want_o = attn.o_proj(want[0])
    (sum(t.square().sum() for t in want) + want_o.sum()).backward()
    want_grads = [hs.grad.clone()] + [p.grad.clone() for p in attn.parameters() if p.requires_grad]
    hs.grad = None
    for p in attn.parameters():
        p.grad = None
    got = lora_qkv(attn, hs)
    got_o = lora_o(attn, got[0])
    (sum(t.square().sum() for t in got) + got_o.sum()).backward()
    got_grads = [hs.grad] + [p.grad for p in attn.parameters() if p.requires_grad]
    for g, w in zip((*got, got_o, *got_grads), (*want, want_o, *want_grads)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,kind", [("gemma", "gelu_tanh"), ("phi3", "phi3"), ("qwen3", "silu")])
def test_other_families_mlp_fused(tiny_model_factory, family, kind):
    """Gemma's GeGLU (tanh GELU) and Phi-3's fused gate_up_proj MLPs are fused and match PEFT."""
    model = _lora_model(tiny_model_factory(family), checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    mlp = model.base_model.model.model.layers[0].mlp
    if kind != "phi3":
        assert activation_kind(mlp.act_fn) == kind
    hs = _hidden(model)
    want = mlp(hs)
    want.square().sum().backward()
    want_grads = [hs.grad.clone()] + [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
    hs.grad = None
    for p in mlp.parameters():
        p.grad = None
    undo = install_fast_lora(model)
    assert undo.mlp_count == 2
    got = mlp(hs)
    got.square().sum().backward()
    got_grads = [hs.grad] + [p.grad for p in mlp.parameters() if p.requires_grad]
    for g, w in zip((got, *got_grads), (want, *want_grads)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    undo()


def test_4bit_model_matches_peft(tiny_llama_dir):
    """NF4 (bitsandbytes on CPU) LoRA model: loss and LoRA gradients equal plain PEFT's."""
    pytest.importorskip("bitsandbytes")
    model = _lora_model(tiny_llama_dir, quant=True)
    model.train()
    ids = _batches(1)[0].to(model.device)

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = step()
    undo = install_fast_lora(model)
    base, _ = lora_parts(model.base_model.model.model.layers[0].mlp.down_proj)
    assert base.quant_state is not None  # the fused path reads the NF4 weight itself
    loss, grads = step()
    undo()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_bad_argument():
    with pytest.raises(TypeError, match="linears=True"):
        install_fast_lora(torch.nn.Linear(2, 2), linears="yes")


def test_partial_targets_fuse_one_by_one(tiny_llama_dir, caplog):
    """LoRA on q_proj, v_proj and gate_proj only: the MLPs keep their forward, the three LoRA linears are fused one
    by one (lora_qkv too), silently, with PEFT's gradients."""
    model = _lora_model(tiny_llama_dir, checkpointing=False, target_modules=["q_proj", "v_proj", "gate_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = _batches(1)[0].to(model.device)

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = grads()
    with caplog.at_level(logging.WARNING, logger="fastlm.patch.fast_lora"):
        undo = install_fast_lora(model)
        got = grads()
        attn = model.base_model.model.model.layers[0].self_attn
        hs = _hidden(model)
        qkv = lora_qkv(attn, hs)
    assert (undo.mlp_count, undo.linear_count) == (0, 6)
    assert not [r for r in caplog.records if "fused LoRA not used" in r.getMessage()]
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)
    for a, b in zip(qkv, (attn.q_proj(hs), attn.k_proj(hs), attn.v_proj(hs))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    undo()


def test_patched_base_layer_is_left_alone():
    """A base linear whose forward another patch replaced (FP8 backward, say) keeps that forward."""
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    layer = net.base_model.model[0]
    base = layer.get_base_layer()
    base.forward = lambda x: torch.zeros(*x.shape[:-1], 8)  # stands in for another patch's forward
    from fastlm.patch.fast_lora import lora_parts

    assert "patched forward" in lora_parts(layer)
    install_fast_lora(net)
    x = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(layer(x), layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"])
