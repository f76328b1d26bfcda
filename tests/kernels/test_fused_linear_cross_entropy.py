"""Fused linear cross-entropy (chunked, no full logits) vs lm_head + transformers' ForCausalLMLoss and vs the
materialising torch reference: loss and the gradients of hidden, weight and bias."""
import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, DTYPES, assert_close, forward_backward, kernel_module

from fastlm.errors import ConfigError
from fastlm.kernels._triton import force_triton
from fastlm.kernels.reference import fused_linear_cross_entropy_reference

IGNORE = -100
HIDDEN, VOCAB = 24, 1300  # non-pow2; the vocab spans two kernel blocks under the interpreter


def _inputs(dtype, b=2, s=5, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(b, s, HIDDEN).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.3).to(dtype)
    bias = (torch.randn(VOCAB) * 0.1).to(dtype)
    labels = torch.randint(0, VOCAB, (b, s))
    labels[0, :2] = IGNORE
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_bias,softcap,num_items,skip", [(False, None, None, True), (True, 30.0, 7, True),
                                                             (False, 3.0, torch.tensor(11), False)])
def test_fused_linear_ce_matches_lm_head_plus_for_causal_lm_loss(dtype, use_bias, softcap, num_items, skip):
    from transformers.loss.loss_utils import ForCausalLMLoss

    mod = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
    hidden, weight, bias, labels = _inputs(dtype)
    inputs = (hidden, weight, bias) if use_bias else (hidden, weight)
    dloss = torch.tensor(1.7)

    def fast(h, w, b=None):
        with force_triton():  # chunks of 3 tokens: 10 tokens -> 4 chunks
            return mod.fused_linear_cross_entropy(h, w, labels, b, num_items_in_batch=num_items, softcap=softcap,
                                                  chunk_bytes=3 * 4 * VOCAB, skip_ignored=skip)

    def hf(h, w, b=None):
        logits = F.linear(h, w, b).float()
        if softcap is not None:  # Gemma2ForCausalLM: logits / cap -> tanh -> * cap, then the loss
            logits = torch.tanh(logits / softcap) * softcap
        return ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=num_items)

    def ref(h, w, b=None):
        return fused_linear_cross_entropy_reference(h, w, labels, b, num_items_in_batch=num_items, softcap=softcap)

    got = forward_backward(fast, inputs, dloss)
    for expected in (forward_backward(ref, inputs, dloss), forward_backward(hf, inputs, dloss)):
        assert_close(got[0], expected[0], torch.float32, grad=True)
        for g, e in zip(got[1:], expected[1:]):
            assert g.dtype == e.dtype and g.shape == e.shape
            assert_close(g, e, dtype, grad=True, scale="max")


def test_frozen_lm_head_shift_labels_and_tiny_input():
    mod = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
    hidden, weight, _, labels = _inputs(torch.float32, b=1, s=1, seed=3)
    shift = torch.tensor([[7]])  # one token, one real target (labels would shift it away)
    h = hidden.clone().requires_grad_(True)
    with force_triton():
        loss = mod.fused_linear_cross_entropy(h, weight, shift_labels=shift, scale=0.5)
    loss.backward()
    h_ref = hidden.clone().requires_grad_(True)
    expected = F.cross_entropy(F.linear(h_ref, weight).float().view(1, -1) * 0.5, shift.view(-1))
    expected.backward()
    assert weight.grad is None
    assert_close(loss, expected, torch.float32, grad=True)
    assert_close(h.grad, h_ref.grad, torch.float32, grad=True)


def test_all_targets_ignored_gives_zero_loss_and_gradients_with_num_items():
    mod = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
    hidden, weight, _, labels = _inputs(torch.float32, seed=5)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with force_triton():
        loss = mod.fused_linear_cross_entropy(h, w, torch.full_like(labels, IGNORE), num_items_in_batch=4)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max().item() == 0.0 and w.grad.abs().max().item() == 0.0


def test_chunk_rows_keeps_the_fp32_chunk_within_budget():
    mod = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
    assert mod.chunk_rows(8192, 128256, 256 * 2**20) == 512  # 523 fp32 rows fit in 256 MiB; 64-multiple
    assert mod.chunk_rows(8192, 128256, 20 * 2**20) == 40  # 40 * 128256 * 4 bytes <= 20 MiB < 41 * ...
    assert mod.chunk_rows(10, 128256, 1) == 1
    assert mod.chunk_rows(10, 100, 2**30) == 10


def test_no_grad_evaluation_gives_the_same_loss():
    mod = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
    hidden, weight, _, labels = _inputs(torch.float32, seed=4)
    hidden.requires_grad_(True)
    with torch.no_grad(), force_triton():
        loss = mod.fused_linear_cross_entropy(hidden, weight, labels, chunk_bytes=3 * 4 * VOCAB)
    assert loss.grad_fn is None
    assert_close(loss, fused_linear_cross_entropy_reference(hidden, weight, labels).detach(), torch.float32,
                 grad=True)


def test_fused_linear_ce_bad_arguments_name_the_fix():
    mod = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
    hidden, weight, _, labels = _inputs(torch.float32)
    with pytest.raises(ConfigError, match=r"weight.shape=\(1300, 23\)"):
        mod.fused_linear_cross_entropy(hidden, weight[:, :23], labels)
    with pytest.raises(ConfigError, match=r"labels.shape=\(2, 4\)"):
        mod.fused_linear_cross_entropy(hidden, weight, labels[:, :4])
    with pytest.raises(ConfigError, match="chunk_bytes=0"):
        mod.fused_linear_cross_entropy(hidden, weight, labels, chunk_bytes=0)
    if not CUDA:  # a device-side assert on CUDA
        with pytest.raises(RuntimeError, match="targets must be in"), force_triton():
            mod.fused_linear_cross_entropy(hidden, weight, labels + VOCAB)
