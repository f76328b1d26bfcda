"""The generate fastlm attaches (engine-backed in eval mode, the training-time one in train mode, transformers' own
for what the engine does not serve) runs the deep copy's weights on a `copy.deepcopy` of the model."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from .conftest import load

peft = pytest.importorskip("peft")


def test_generate_on_a_deep_copy_runs_the_copys_weights(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, lora=True)
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    before = model.generate(ids, **greedy)  # the original's engine exists when it is copied

    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("model.layers.0.self_attn.v_proj.lora_B.default.weight",
                     "model.layers.1.mlp.down_proj.base_layer.weight", "lm_head.weight"):
            key = next(n for n in params if n.endswith(name))
            params[key].add_(torch.randn(params[key].shape, generator=gen))
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    plain = peft.get_peft_model(plain, copy.deepcopy(twin.peft_config["default"]))
    plain.load_state_dict(twin.state_dict())
    plain.eval()
    expected = plain.generate(ids, **greedy)
    assert not torch.equal(expected, before)  # the change is visible in the tokens

    assert torch.equal(twin.generate(ids, **greedy), expected)  # engine-backed generate
    beams = dict(greedy, num_beams=3)  # not served by the engine: transformers' generate of the copy (3: the
    # fallback notice is said once per process, and other tests wait for the one of num_beams=2)
    assert torch.equal(twin.generate(ids, **beams), plain.generate(ids, **beams))
    twin.train()  # a trainer's generation step on the copy: the training-time generate
    assert torch.equal(twin.generate(ids, **greedy), expected)
    twin.eval()
    assert torch.equal(model.generate(ids, **greedy), before)


def test_a_deep_copy_gets_no_engine_of_the_original(tiny_model_factory):
    """The engine (fused copies, KV cache, CUDA graphs on a GPU) is not copied with the model: the copy builds its
    own on first use, and the original keeps its engine."""
    import copy

    from fastlm import FastLanguageModel
    from fastlm.inference.engine import get_engine
    from fastlm.state import base_model_of

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_factory("llama")), max_seq_length=64,
                                                   load_in_16bit=True)
    engine = get_engine(model, 1, 64)
    clone = copy.deepcopy(model)
    assert base_model_of(clone).__dict__.get("_fastlm_engine") is None
    assert base_model_of(model).__dict__["_fastlm_engine"] is engine
    assert get_engine(clone, 1, 64) is not engine and get_engine(clone, 1, 64).base is base_model_of(clone)
