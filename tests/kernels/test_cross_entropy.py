"""Cross-entropy kernel vs torch's cross_entropy on full logits and vs transformers' ForCausalLMLoss
(num_items_in_batch, shifted labels), with softcap/scale, ignore_index and vocabularies over several blocks."""
import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, DTYPES, assert_close, forward_backward, kernel_module

from fastlm.errors import ConfigError
from fastlm.kernels._triton import force_triton
from fastlm.kernels.reference import cross_entropy_reference

IGNORE = -100


def _targets(n, vocab, n_ignored=2, seed=0):
    torch.manual_seed(seed)
    t = torch.randint(0, vocab, (n,))
    t[torch.randperm(n)[:n_ignored]] = IGNORE
    return t


def _hf_style(logits, targets, num_items_in_batch, softcap, scale):
    """What a model + transformers' fixed_cross_entropy compute: transform the fp32 logits, then torch CE."""
    z = logits.float() * (scale if scale is not None else 1.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    red = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction=red)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(7, 37), (5, 3000), (1, 1)])
@pytest.mark.parametrize("softcap,scale,num_items", [(None, None, None), (30.0, None, 9), (None, 0.5, None),
                                                      (3.0, 2.0, torch.tensor(9))])
def test_cross_entropy_matches_torch_on_full_logits(n, vocab, dtype, softcap, scale, num_items):
    mod = kernel_module("cross_entropy")
    torch.manual_seed(0)
    logits = torch.randn(n, vocab, dtype=dtype) * 4
    targets = _targets(n, vocab, n_ignored=min(2, n - 1))
    dloss = torch.tensor(1.7)

    def fast(x):
        with force_triton():
            return mod.cross_entropy(x, targets, IGNORE, num_items, softcap, scale)

    loss, grad = forward_backward(fast, (logits,), dloss)
    loss_ref, grad_ref = forward_backward(
        lambda x: cross_entropy_reference(x, targets, IGNORE, num_items, softcap, scale), (logits,), dloss)
    loss_hf, grad_hf = forward_backward(lambda x: _hf_style(x, targets, num_items, softcap, scale), (logits,), dloss)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    for expected_loss, expected_grad in ((loss_ref, grad_ref), (loss_hf, grad_hf)):
        assert_close(loss, expected_loss, torch.float32, grad=True)
        assert_close(grad, expected_grad, dtype, grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_lm_loss_matches_transformers_for_causal_lm_loss(dtype):
    from transformers.loss.loss_utils import ForCausalLMLoss

    mod = kernel_module("cross_entropy")
    torch.manual_seed(1)
    vocab = 1500
    logits = torch.randn(2, 6, vocab, dtype=dtype) * 3
    labels = torch.randint(0, vocab, (2, 6))
    labels[0, :2] = IGNORE  # a masked prompt
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(13)}):
        def fast(x):
            with force_triton():
                return mod.causal_lm_loss(x, labels, **kwargs)

        loss, grad = forward_backward(fast, (logits,), torch.tensor(1.0))
        loss_hf, grad_hf = forward_backward(lambda x: ForCausalLMLoss(x, labels, vocab, **kwargs), (logits,),
                                            torch.tensor(1.0))
        assert_close(loss, loss_hf, torch.float32, grad=True)
        assert_close(grad, grad_hf, dtype, grad=True)
    # shift_labels given directly (what transformers passes for sequence-parallel / packed inputs)
    shift = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].contiguous()
    with force_triton():
        loss = mod.causal_lm_loss(logits, shift_labels=shift)
    assert_close(loss, ForCausalLMLoss(logits, None, vocab, shift_labels=shift), torch.float32, grad=True)


def test_inplace_backward_writes_the_gradient_into_the_logits():
    mod = kernel_module("cross_entropy")
    torch.manual_seed(2)
    base = torch.randn(4, 2100, requires_grad=True)
    targets = _targets(4, 2100, n_ignored=1)
    logits = base * 1.0  # a non-leaf, as the lm_head output is
    with force_triton():
        loss = mod.cross_entropy(logits, targets, softcap=10.0, inplace_backward=True)
    loss.backward()
    expected = forward_backward(lambda x: cross_entropy_reference(x, targets, softcap=10.0), (base.detach(),),
                                torch.tensor(1.0))[1]
    assert_close(base.grad, expected, torch.float32, grad=True)
    assert_close(logits.detach(), expected, torch.float32, grad=True)  # the buffer now holds the gradient


def test_cross_entropy_bad_arguments_name_the_fix():
    mod = kernel_module("cross_entropy")
    logits = torch.randn(3, 10)
    with pytest.raises(ConfigError, match="softcap=-1.0.*positive"):
        mod.cross_entropy(logits, torch.zeros(3, dtype=torch.long), softcap=-1.0)
    with pytest.raises(ConfigError, match=r"targets.shape=\(4,\).*\(3,\)"):
        mod.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="labels/shift_labels.*exactly one"):
        mod.causal_lm_loss(logits[None])
    if not CUDA:  # on CUDA this is a device-side assert, which would end the test process's CUDA context
        with pytest.raises(RuntimeError, match=r"targets must be in \[0, 10\).*fix the labels"), force_triton():
            mod.cross_entropy(logits, torch.tensor([1, 10, IGNORE]))
