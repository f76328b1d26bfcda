"""Undoing fused LoRA while someone else's wrapper sits on top of a fused forward: the wrapped layer computes
PEFT's forward again, and a later install leaves that layer alone instead of wrapping the wrapper."""
import types

import pytest
import torch

from fastlm import FastLanguageModel, patch
from fastlm.patch.fast_lora import install_fast_lora

pytest.importorskip("peft")


def test_undo_under_a_foreign_wrapper_delegates_and_a_new_install_skips_the_layer(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_16bit=True, dtype=torch.float32,
                                                 max_seq_length=64, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                             use_gradient_checkpointing=False)
    patch.remove(model)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = model(input_ids=ids).logits.detach()  # grad enabled: the fused path would run if installed

    undo = install_fast_lora(model)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    fused_forward, calls = q_proj.forward, []

    def foreign(self, x, *args, **kwargs):  # e.g. a hook library wrapping whatever forward is there
        calls.append(1)
        return fused_forward(x, *args, **kwargs)

    q_proj.forward = types.MethodType(foreign, q_proj)
    undo()
    assert torch.equal(model(input_ids=ids).logits, plain) and calls  # the wrapper reaches PEFT's forward

    again = install_fast_lora(model)
    assert (again.mlp_count, again.linear_count) == (undo.mlp_count, undo.linear_count - 1)
    torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=1e-5, rtol=1e-5)
    again()
    assert torch.equal(model(input_ids=ids).logits, plain)
