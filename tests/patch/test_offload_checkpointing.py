"""Offloaded checkpointing ("unsloth" mode) gives exactly the gradients of plain checkpointing and of none.

On CPU it is recompute checkpointing (the offload to pinned memory needs CUDA; the GPU test below and
scripts/gpu_offload_check.py cover that). fp32 tiny Llama with LoRA on all 7 linears; compared: the loss and every
LoRA gradient, against transformers' non-reentrant checkpointing and against no checkpointing."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fastlm.bench.shapes import shape_config
from fastlm.patch.offload_checkpointing import (install_offloaded_checkpointing, is_offloaded_checkpointing,
                                                remove_offloaded_checkpointing)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(dropout=0.0, input_grads=True, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape_config("tiny-llama"), attn_implementation="sdpa").to(device, dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():  # B = 0 after init would leave every A gradient zero: make all LoRA gradients live
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    if input_grads:
        model.enable_input_require_grads()
    model.train()
    return model


def _hf_checkpointing(model):
    base = model.get_base_model()
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 512, (2, 48), generator=g).to(device)
    positions = torch.cat([torch.arange(20), torch.arange(28)]).expand(2, -1).to(device)  # packed: two sequences
    return {"input_ids": ids, "labels": ids, "position_ids": positions}


def _loss_and_grads(model, seed=7, autocast=None, device="cpu"):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else torch.autocast(device, enabled=False)
    with ctx:
        loss = model(**_batch(device), use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def _assert_same(a, b, tol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_loss_and_lora_grads_as_plain_and_no_checkpointing(dropout):
    model = _lora_model(dropout)
    reference = _loss_and_grads(model)  # no checkpointing
    _hf_checkpointing(model)
    plain = _loss_and_grads(model)
    layer = model.get_base_model().model.layers[0]
    hf_func = layer._gradient_checkpointing_func
    undo = install_offloaded_checkpointing(model)
    assert layer._gradient_checkpointing_func is not hf_func
    offloaded = _loss_and_grads(model)
    _assert_same(offloaded, plain)
    _assert_same(offloaded, reference)
    # the recompute replays the forward's dropout masks: with another seed the loss changes
    if dropout:
        assert not torch.allclose(_loss_and_grads(model, seed=8)[0], offloaded[0])
    undo()
    assert layer._gradient_checkpointing_func is hf_func
    _assert_same(_loss_and_grads(model), plain)


def test_lora_grads_flow_when_embeddings_do_not_require_grad():
    # frozen base + LoRA, no enable_input_require_grads: the layer inputs never require grad
    model = _lora_model(input_grads=False)
    reference = _loss_and_grads(model)
    install_offloaded_checkpointing(model)
    install_offloaded_checkpointing(model)  # a second install replaces the first
    assert model.get_base_model().is_gradient_checkpointing and is_offloaded_checkpointing(model)
    _assert_same(_loss_and_grads(model), reference)
    assert remove_offloaded_checkpointing(model) and not remove_offloaded_checkpointing(model)
    assert not model.get_base_model().is_gradient_checkpointing and not is_offloaded_checkpointing(model)


def test_recompute_runs_under_the_forward_autocast():
    model = _lora_model()
    _hf_checkpointing(model)
    plain = _loss_and_grads(model, autocast=True)
    install_offloaded_checkpointing(model)
    _assert_same(_loss_and_grads(model, autocast=True), plain, tol=0)


def test_only_the_layer_input_is_kept_and_use_cache_is_off():
    model = _lora_model()
    base = model.get_base_model()
    base.config.use_cache = True
    undo = install_offloaded_checkpointing(model)
    assert base.config.use_cache is False
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        model(**_batch(), use_cache=False).loss
    hidden = [t for t in kept if t.dim() == 3 and t.shape[-1] == 64 and t.is_floating_point()]
    # per layer: its input (2 layers), plus what the final norm and lm_head save outside the layers
    assert len(hidden) <= 2 + 3, [tuple(t.shape) for t in hidden]
    undo()
    assert base.config.use_cache is True


def test_a_model_without_checkpointable_layers_is_refused():
    from fastlm.errors import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError, match="use_gradient_checkpointing=True"):
        install_offloaded_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading to pinned memory needs CUDA")
def test_cuda_offload_matches_plain_checkpointing_in_bf16():
    model = _lora_model(device="cuda", dtype=torch.bfloat16)
    _hf_checkpointing(model)
    plain = _loss_and_grads(model, device="cuda", autocast=True)
    install_offloaded_checkpointing(model)
    _assert_same(_loss_and_grads(model, device="cuda", autocast=True), plain, tol=1e-2)


def test_each_backward_prefetches_the_input_of_the_layer_run_before_it():
    from fastlm.patch.offload_checkpointing import OffloadState

    class Saved:  # stands in for OffloadedInput (which needs CUDA)
        pass

    state = OffloadState()
    first, second, third = Saved(), Saved(), Saved()
    for saved in (first, second, third):
        state.push(saved)
    dropped = Saved()
    state.push(dropped)
    del dropped  # a forward whose graph was freed without a backward leaves nothing behind
    fourth = Saved()
    state.push(fourth)
    assert len(state.pending) == 4
    assert state.take(fourth) is third and state.take(third) is second
    assert state.take(second) is first and state.take(first) is None and state.pending == []


def test_bound_layer_call_form_of_older_transformers():
    """transformers 5.17 hands the checkpoint function `partial(layer.__call__, **kwargs)` instead of
    `partial(forward, layer, **kwargs)`: both must recompute to the same gradients."""
    import functools

    from fastlm.patch.offload_checkpointing import OffloadState, offloaded_checkpoint

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ref = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    out = offloaded_checkpoint(functools.partial(layer.__call__), x, state=OffloadState())
    out.pow(2).sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_next_input_is_fetched_after_the_mlp_backward_not_during_it():
    """The copy of the next layer's input back to the GPU starts once this layer's MLP backward has produced the
    MLP input's gradient (so its buffer is not live at the MLP backward, a layer's peak), and exactly once; without
    an `mlp` submodule it starts at once."""
    from torch import nn

    from fastlm.patch.offload_checkpointing import _prefetch_after_mlp_backward

    events = []

    class Following:
        def prefetch(self):
            events.append("prefetch")

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)
            self.mlp.register_full_backward_hook(lambda *a: events.append("mlp backward"))
            self.attn.register_full_backward_hook(lambda *a: events.append("attn backward"))

        def forward(self, x):
            return self.mlp(self.attn(x))

    layer = Layer()
    hook = _prefetch_after_mlp_backward(layer, Following())
    out = layer(torch.randn(2, 4, requires_grad=True))
    hook.remove()
    assert events == []
    out.sum().backward()
    assert events == ["mlp backward", "prefetch", "attn backward"]

    events.clear()
    assert _prefetch_after_mlp_backward(nn.Linear(4, 4), Following()) is None and events == ["prefetch"]


def test_pinned_pieces_cover_an_input_with_powers_of_two_and_little_to_spare():
    """torch's pinned allocator rounds each request up to a power of two (a 3.3 GB layer input of Llama-3.1-8B at
    400k tokens would hold 4.3 GB): the host copy is made of power-of-two pieces instead, less than MIN_PIECE over."""
    from fastlm.patch.offload_checkpointing import MIN_PIECE, pinned_pieces

    for n in [1, 3, 100, 5000, MIN_PIECE, MIN_PIECE + 1, 33554432, 400_000 * 4096 * 2, 2 ** 31, 2 ** 31 + 12345]:
        pieces = pinned_pieces(n)
        assert all(p & (p - 1) == 0 for p in pieces) and sum(pieces) >= n
        assert sum(pieces) - n < (MIN_PIECE if n > MIN_PIECE else n)
    assert sum(pinned_pieces(400_000 * 4096 * 2)) < 400_000 * 4096 * 2 + MIN_PIECE  # 3.28 GB, not 4.29


def test_large_inputs_are_pinned_only_while_host_memory_allows(monkeypatch):
    """A layer input of CHECK_HOST_FROM bytes or more is pinned only if HOST_RESERVE stays available; growth that
    the pinned allocator's cache covers (bytes held before, released by a backward) needs no new host memory."""
    from fastlm.patch import offload_checkpointing as oc

    state = oc.OffloadState()
    big = 3 << 30
    monkeypatch.setattr(oc, "available_ram_bytes", lambda: big + oc.HOST_RESERVE + 1)
    assert state.may_pin(big)
    state.hold(big)
    monkeypatch.setattr(oc, "available_ram_bytes", lambda: big + oc.HOST_RESERVE - 1)
    assert not state.may_pin(big) and state.may_pin(oc.CHECK_HOST_FROM - 1)
    state.release(big)  # the next step reuses the cached block: no host memory needed
    monkeypatch.setattr(oc, "available_ram_bytes", lambda: 0)
    assert state.may_pin(big) and not state.may_pin(big + oc.CHECK_HOST_FROM)
    monkeypatch.setattr(oc, "available_ram_bytes", lambda: None)  # unknown: pin as before
    assert state.may_pin(10 * big)


def test_an_input_the_host_cannot_hold_stays_on_the_device(monkeypatch, caplog):
    """When may_pin says no, offload_input keeps the input where it is (the layer is then checkpointed plainly, as
    on CPU, whose gradients the tests above compare) and warns once per model; when it says yes it pins."""
    import logging

    from fastlm.patch import offload_checkpointing as oc

    pinned = []
    monkeypatch.setattr(oc, "OffloadedInput", lambda t, state: pinned.append(t) or "pinned")
    state = oc.OffloadState()
    x = torch.zeros(4, 8)
    allow = {"now": False}
    monkeypatch.setattr(state, "may_pin", lambda nbytes: nbytes == x.numel() * 4 and allow["now"])
    with caplog.at_level(logging.WARNING, logger="fastlm.patch.offload_checkpointing"):
        assert oc.offload_input(x, state) is None and oc.offload_input(x, state) is None
    assert state.kept_on_gpu == 2 and pinned == []
    assert sum("host memory is short" in r.getMessage() for r in caplog.records) == 1
    allow["now"] = True
    assert oc.offload_input(x, state) == "pinned" and pinned == [x]
