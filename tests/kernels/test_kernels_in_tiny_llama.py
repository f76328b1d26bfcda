"""All core kernels wired into a tiny random Llama (norms, RoPE, SwiGLU, fused linear CE in place of lm_head + loss)
give the loss and every parameter gradient of the plain transformers model."""
import torch
from conftest import CUDA, assert_close, kernel_module
from fixtures.tiny import tiny_config

from fastlm.kernels._triton import force_triton


def _loss_and_grads(model, input_ids, labels, fast, monkeypatch):
    model.zero_grad(set_to_none=True)
    if not fast:
        loss = model(input_ids=input_ids, labels=labels).loss
    else:
        norm, rope = kernel_module("rms_norm"), kernel_module("rope")
        act = kernel_module("activations")
        flce = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
        import transformers.models.llama.modeling_llama as llama

        with monkeypatch.context() as m:
            m.setattr(llama, "apply_rotary_pos_emb", lambda q, k, cos, sin: rope.apply_rope(q, k, cos, sin))
            for mod in model.modules():
                if isinstance(mod, llama.LlamaRMSNorm):
                    m.setattr(mod, "forward", lambda x, mod=mod: norm.rms_norm(x, mod.weight, mod.variance_epsilon))
                elif isinstance(mod, llama.LlamaMLP):
                    m.setattr(mod, "forward", lambda x, mod=mod: mod.down_proj(act.swiglu(mod.gate_proj(x),
                                                                                           mod.up_proj(x))))
            hidden = model.model(input_ids=input_ids).last_hidden_state
            loss = flce.fused_linear_cross_entropy(hidden, model.lm_head.weight, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiny_llama_with_all_kernels_matches_transformers(monkeypatch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=300, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                                   "factor": 8.0, "low_freq_factor": 1.0,
                                                                   "high_freq_factor": 4.0,
                                                                   "original_max_position_embeddings": 8})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # non-trivial norm weights
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    input_ids = torch.randint(0, 300, (2, 11))
    labels = input_ids.clone()
    labels[0, :4] = -100
    loss_hf, grads_hf = _loss_and_grads(model, input_ids, labels, False, monkeypatch)
    with force_triton(not CUDA):
        loss, grads = _loss_and_grads(model, input_ids, labels, True, monkeypatch)
    assert_close(loss, loss_hf, torch.float32, grad=True)
    assert grads.keys() == grads_hf.keys()
    for name in grads:
        assert_close(grads[name], grads_hf[name], torch.float32, grad=True, scale="max")
