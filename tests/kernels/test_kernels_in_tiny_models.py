"""All core kernels wired into tiny random models (norms incl. Qwen3's q/k-norm and Gemma's (1 + w), RoPE, SwiGLU or
GeGLU-tanh, fused linear CE with Gemma-2's final softcap in place of lm_head + loss) give the loss and every
parameter gradient of the plain transformers model."""
import importlib

import pytest
import torch
from conftest import CUDA, assert_close, kernel_module
from fixtures.tiny import tiny_config

from fastlm.kernels._triton import force_triton

# model_type -> (class-name prefix, norm (offset, cast), MLP activation)
FAMILIES = {"llama": ("Llama", (0.0, "llama"), "swiglu"), "qwen3": ("Qwen3", (0.0, "llama"), "swiglu"),
            "gemma2": ("Gemma2", (1.0, "gemma"), "geglu_tanh")}


def _install(m, model, model_type):
    """Point the model's norms, MLPs and RoPE at the kernels (inside monkeypatch context m)."""
    prefix, (offset, cast), act_name = FAMILIES[model_type]
    norm, rope, act = kernel_module("rms_norm"), kernel_module("rope"), kernel_module("activations")
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    act_fn = act.swiglu if act_name == "swiglu" else (lambda g, u: act.geglu(g, u, "tanh"))
    m.setattr(modeling, "apply_rotary_pos_emb", lambda q, k, cos, sin: rope.apply_rope(q, k, cos, sin))
    n_norms = 0
    for mod in model.modules():
        if isinstance(mod, getattr(modeling, f"{prefix}RMSNorm")):
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
            m.setattr(mod, "forward", lambda x, mod=mod, eps=eps: norm.rms_norm(x, mod.weight, eps, offset, cast))
            n_norms += 1
        elif isinstance(mod, getattr(modeling, f"{prefix}MLP")):
            m.setattr(mod, "forward", lambda x, mod=mod: mod.down_proj(act_fn(mod.gate_proj(x), mod.up_proj(x))))
    return n_norms


def _loss_and_grads(model, model_type, input_ids, labels, fast, monkeypatch):
    model.zero_grad(set_to_none=True)
    if not fast:
        loss = model(input_ids=input_ids, labels=labels).loss
    else:
        flce = kernel_module("fused_linear_cross_entropy", uses=("cross_entropy",))
        with monkeypatch.context() as m:
            n_norms = _install(m, model, model_type)
            assert n_norms >= 2 * model.config.num_hidden_layers + 1
            hidden = model.model(input_ids=input_ids).last_hidden_state
            loss = flce.fused_linear_cross_entropy(hidden, model.lm_head.weight, labels,
                                                   softcap=getattr(model.config, "final_logit_softcapping", None))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_tiny_model_with_all_kernels_matches_transformers(model_type, monkeypatch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {}
    if model_type == "llama":  # a scaled RoPE
        extra["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8}
    if model_type == "gemma2":  # a softcap that bites on these small logits
        extra["final_logit_softcapping"] = 0.5
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=300, **extra),
                                             attn_implementation="eager")
    with torch.no_grad():  # non-trivial norm weights
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    input_ids = torch.randint(0, 300, (2, 11))
    labels = input_ids.clone()
    labels[0, :4] = -100
    loss_hf, grads_hf = _loss_and_grads(model, model_type, input_ids, labels, False, monkeypatch)
    with force_triton(not CUDA):
        loss, grads = _loss_and_grads(model, model_type, input_ids, labels, True, monkeypatch)
    assert_close(loss, loss_hf, torch.float32, grad=True)
    assert grads.keys() == grads_hf.keys()
    for name in grads:
        assert_close(grads[name], grads_hf[name], torch.float32, grad=True, scale="max")
