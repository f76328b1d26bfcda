"""fastlm's offloaded checkpointing ("unsloth") stays on through transformers' own disable/enable calls.

TRL turns gradient checkpointing off and on again around every generation step
(`gradient_checkpointing_disable()` / `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`), and the
Trainer enables it at train start. Enabling must keep fastlm's offloaded function on the decoder layers, disabling
must still disable, and `fastlm.patch.remove` must give back transformers' plain behaviour.

Which checkpoint function runs is counted at the source: calls of `OffloadedCheckpointFunction.apply` (the autograd
Function of the offloaded path) and of `torch.utils.checkpoint.checkpoint` as transformers' modeling_utils uses it.
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fastlm import FastLanguageModel, patch
from fastlm.patch.checkpointing import is_checkpointing
from fastlm.patch.offload_checkpointing import install_offloaded_checkpointing, is_offloaded_checkpointing

N_LAYERS = 2  # tests/fixtures/tiny.py


@pytest.fixture
def calls(checkpoint_calls):
    """Counts of the offloaded and the plain checkpoint function, per forward with grad (tests/conftest.py)."""
    return checkpoint_calls


def _fastlm_lora(path, mode="unsloth"):
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_16bit=True, dtype=torch.float32,
                                                 max_seq_length=64, use_gradient_checkpointing=mode)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                             use_gradient_checkpointing=mode)
    return _live_lora(model)


def _live_lora(model):
    with torch.no_grad():  # B = 0 after init would leave every A gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    return model


def _step(model, calls):
    """One training forward + backward; returns (loss, LoRA grads, {function: calls during the step})."""
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    before = dict(calls)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads, {k: calls[k] - before[k] for k in calls}


def _assert_same(a, b, tol=0.0):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


def _toggle(target, api, kwargs):
    if api == "gradient":  # TRL's calls (transformers 5.17's only names)
        target.gradient_checkpointing_disable()
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:  # transformers >= 5.2x names
        target.activation_checkpointing_disable()
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("on,api,kwargs", [("peft", "gradient", {"use_reentrant": False}),
                                           ("base", "gradient", {"use_reentrant": True}),
                                           ("base", "activation", {"use_reentrant": False})])
def test_reenabling_keeps_the_offloaded_function_and_disabling_disables(tiny_llama_dir, calls, on, api, kwargs):
    model = _fastlm_lora(tiny_llama_dir)
    base = model.get_base_model()
    if api == "activation" and not hasattr(base, "activation_checkpointing_enable"):
        pytest.skip("transformers < 5.2x has no activation_checkpointing_* names")
    target = model if on == "peft" else base
    reference = _step(model, calls)
    assert reference[2] == {"offloaded": N_LAYERS, "plain": 0}

    target.gradient_checkpointing_disable() if api == "gradient" else target.activation_checkpointing_disable()
    assert not is_checkpointing(base)
    off = _step(model, calls)
    assert off[2] == {"offloaded": 0, "plain": 0}  # really off: no checkpoint function runs at all
    _assert_same(off, reference, tol=1e-5)  # the same numbers up to float summation order

    for _ in range(2):  # TRL toggles around every generation step
        _toggle(target, api, kwargs)
        again = _step(model, calls)
        assert again[2] == {"offloaded": N_LAYERS, "plain": 0}
        _assert_same(again, reference)
    assert is_offloaded_checkpointing(model)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_patch_remove_gives_back_transformers_checkpointing(tiny_llama_dir, calls):
    model = _fastlm_lora(tiny_llama_dir)
    base = model.get_base_model()
    reference = _step(model, calls)
    assert "offloaded_checkpointing" in patch.remove(model)
    assert not is_offloaded_checkpointing(model)
    assert not any("_set_gradient_checkpointing" in m.__dict__ for m in model.modules())
    still_on = _step(model, calls)  # the plain checkpointing that was on before fastlm's took over
    assert is_checkpointing(base) and still_on[2] == {"offloaded": 0, "plain": N_LAYERS}
    _toggle(model, "gradient", {"use_reentrant": False})
    plain = _step(model, calls)
    assert plain[2] == {"offloaded": 0, "plain": N_LAYERS}
    torch.testing.assert_close(plain[0], reference[0])
    model.gradient_checkpointing_disable()
    assert _step(model, calls)[2] == {"offloaded": 0, "plain": 0}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_plain_checkpointing_asked_for_stays_plain(tiny_llama_dir, calls):
    model = _fastlm_lora(tiny_llama_dir, mode=True)
    assert not is_offloaded_checkpointing(model)
    assert _step(model, calls)[2] == {"offloaded": 0, "plain": N_LAYERS}
    _toggle(model, "gradient", {"use_reentrant": False})
    assert _step(model, calls)[2] == {"offloaded": 0, "plain": N_LAYERS}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_deep_copy_toggles_only_itself(tiny_llama_dir, calls):
    plain_model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = get_peft_model(plain_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    install_offloaded_checkpointing(_live_lora(model))
    twin = copy.deepcopy(model)
    model.gradient_checkpointing_disable()
    twin.gradient_checkpointing_disable()
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not is_checkpointing(model.get_base_model())  # the original stays off
    assert is_offloaded_checkpointing(twin) and _step(twin, calls)[2] == {"offloaded": N_LAYERS, "plain": 0}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert _step(model, calls)[2] == {"offloaded": N_LAYERS, "plain": 0}
