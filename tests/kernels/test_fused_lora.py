"""Fused LoRA functions vs PEFT's own LoRA layers (16-bit and bitsandbytes NF4 bases), forward and backward."""
import importlib


import pytest
import torch

# These run the Triton kernels on CPU tensors through the interpreter (tests/conftest.py turns it on on machines
# without CUDA); a GPU machine checks the compiled kernels with scripts/gpu_lora_check.py instead.
if torch.cuda.is_available():
    pytest.skip("interpreter tests of the fused LoRA / NF4 kernels; on CUDA run scripts/gpu_lora_check.py",
                allow_module_level=True)
from torch import nn  # noqa: E402

peft = pytest.importorskip("peft")

from fastlm.kernels.lora_reference import lora_linear_reference, lora_mlp_reference  # noqa: E402
from fastlm.patch.fast_lora import lora_parts  # noqa: E402

H, I, KV = 48, 80, 16
HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # transformers' ACT2FN names
# (atol, rtol) against PEFT. fp32: same arithmetic up to summation order. fp16: PEFT runs the LoRA branch in
# the adapters' fp32 and rounds the sum once, the fused path runs it in fp16 (measured: at most 1.4e-3 of the
# largest output or gradient, NF4 MLP the worst).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}


def lora_module():
    mod = importlib.import_module("fastlm.kernels.lora")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(mod._act_mul_forward_kernel, InterpretedFunction):
        mod = importlib.reload(mod)
    return mod


class Block(nn.Module):
    """An attention's projections and a transformers LlamaMLP: the layers install_fast_lora fuses."""

    def __init__(self, act="silu", bias=False):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        self.q_proj = nn.Linear(H, H, bias=bias)
        self.k_proj = nn.Linear(H, KV, bias=bias)
        self.v_proj = nn.Linear(H, KV, bias=bias)
        self.o_proj = nn.Linear(H, H, bias=bias)
        config = LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act=HF_ACT[act], num_attention_heads=4)
        self.mlp = LlamaMLP(config)


def _to_4bit(model, compute_dtype):
    bnb = pytest.importorskip("bitsandbytes")
    from fastlm.patch.bnb_cpu import keep_cpu_4bit_trainable

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, q.to("cpu"))
    model.is_loaded_in_4bit = True
    keep_cpu_4bit_trainable(model)
    return model


def peft_block(dtype, quant=False, act="silu", bias=False, r=4, seed=0):
    """A PEFT-wrapped Block in `dtype` (adapters autocast to fp32 as PEFT does), B initialised non-zero."""
    torch.manual_seed(seed)
    block = Block(act, bias)
    block = _to_4bit(block, dtype) if quant else block.to(dtype)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    model = peft.get_peft_model(block, config)
    return model.base_model.model


def _run(fn, x, params, grad_out_seed=1):
    """Outputs and the gradients of x and params for a random upstream gradient."""
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach().float() for o in outs], [x.grad.float()] + [p.grad.float() for p in params]


def _adapter_params(*layers):
    return [t for layer in layers for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]


def _assert_match(got, want, dtype):
    atol, rtol = TOL[dtype]
    for g, w in zip(got, want):
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol)


CASES = [(torch.float32, False), (torch.float16, False), (torch.float32, True), (torch.float16, True)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,quant", CASES)
def test_linear_matches_peft(dtype, quant, bias):
    from fastlm.kernels.lora import fused_lora_linear

    block = peft_block(dtype, quant, bias=bias)
    layer = block.o_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT autocasts adapters
    x = torch.randn(2, 7, H).to(dtype)
    params = _adapter_params(layer)
    want = _run(layer, x, params)
    got = _run(lambda t: fused_lora_linear(t, *lora_parts(layer)), x, params)
    assert got[0][0].dtype == want[0][0].dtype
    _assert_match(got[0] + got[1], want[0] + want[1], dtype)


@pytest.mark.parametrize("dtype,quant", CASES)
def test_qkv_matches_peft(dtype, quant):
    from fastlm.kernels.lora import fused_lora_qkv

    block = peft_block(dtype, quant, bias=True)
    layers = (block.q_proj, block.k_proj, block.v_proj)
    layers[1].scaling["default"] = 0.5  # the three scales differ
    x = torch.randn(3, 5, H).to(dtype)
    params = _adapter_params(*layers)
    want = _run(lambda t: tuple(m(t) for m in layers), x, params)
    parts = [lora_parts(m) for m in layers]
    got = _run(lambda t: fused_lora_qkv(t, [p[0] for p in parts], [p[1] for p in parts]), x, params)
    assert [o.shape for o in got[0]] == [torch.Size([3, 5, H]), torch.Size([3, 5, KV]), torch.Size([3, 5, KV])]
    _assert_match(got[0] + got[1], want[0] + want[1], dtype)


MLP_CASES = [(torch.float32, False, "silu"), (torch.float32, False, "gelu"), (torch.float32, False, "gelu_tanh"),
             (torch.float16, False, "silu"), (torch.float32, True, "silu"), (torch.float16, True, "gelu_tanh")]


@pytest.mark.parametrize("dtype,quant,act", MLP_CASES)
def test_mlp_matches_peft(dtype, quant, act):
    from fastlm.kernels.lora import fused_lora_mlp

    block = peft_block(dtype, quant, act=act)
    mlp = block.mlp
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    x = torch.randn(2, 9, H).to(dtype)
    params = _adapter_params(*layers)
    want = _run(mlp, x, params)
    parts = [lora_parts(m) for m in layers]
    got = _run(lambda t: fused_lora_mlp(t, *(p[0] for p in parts), tuple(p[1] for p in parts), act), x, params)
    _assert_match(got[0] + got[1], want[0] + want[1], dtype)


def _dense_parts(parts):
    return [(p[0].dense(torch.float64), None if p[0].bias is None else p[0].bias.double(), p[1].A, p[1].B,
             p[1].scale) for p in parts]


@pytest.mark.parametrize("overwrite", [True, False])
def test_mlp_backward_twice_either_raises_naming_the_fix_or_repeats(overwrite, monkeypatch):
    """The MLP backward writes dg/du over its saved activations (memory): a second backward through the same graph
    is refused with the fix named, and with OVERWRITE_SAVED off it gives the same gradients again."""
    from fastlm.kernels import lora
    from fastlm.kernels.lora import Adapter, BaseWeight, fused_lora_mlp

    monkeypatch.setattr(lora, "OVERWRITE_SAVED", overwrite)
    torch.manual_seed(0)
    bases = [BaseWeight(torch.randn(o, i) / i ** 0.5, None, None) for i, o in ((6, 10), (6, 10), (10, 6))]
    ad = [torch.randn(s, requires_grad=True) for s in ((3, 6), (10, 3), (3, 6), (10, 3), (3, 10), (6, 3))]
    adapters = tuple(Adapter(ad[2 * i], ad[2 * i + 1], 2.0) for i in range(3))
    loss = fused_lora_mlp(torch.randn(4, 6), *bases, adapters, "silu").square().sum()
    first = torch.autograd.grad(loss, ad, retain_graph=True)
    if overwrite:
        with pytest.raises(RuntimeError, match="OVERWRITE_SAVED = False"):
            torch.autograd.grad(loss, ad)
    else:
        for a, b in zip(first, torch.autograd.grad(loss, ad)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_mlp_gradcheck_fp64(act, monkeypatch):
    """The hand-derived backward equals the numerical derivative (fp64), through the reference's forward
    (gradcheck backpropagates each graph many times: the saved activations are kept)."""
    from fastlm.kernels import lora
    from fastlm.kernels.lora import Adapter, BaseWeight, fused_lora_mlp

    monkeypatch.setattr(lora, "OVERWRITE_SAVED", False)

    torch.manual_seed(0)
    ws = [(torch.randn(o, i, dtype=torch.float64) / i ** 0.5, torch.randn(o, dtype=torch.float64))
          for i, o in ((6, 10), (6, 10), (10, 6))]
    bases = [BaseWeight(w, None, b) for w, b in ws]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    ad = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((3, 6), (10, 3), (2, 6), (10, 2),
                                                                             (4, 10), (6, 4))]

    def fused(x, *ab):
        adapters = tuple(Adapter(ab[2 * i], ab[2 * i + 1], 0.5 + i) for i in range(3))
        return fused_lora_mlp(x, *bases, adapters, act)

    assert torch.autograd.gradcheck(fused, (x, *ad))
    ref = lora_mlp_reference(x, *[(w, b, ad[2 * i], ad[2 * i + 1], 0.5 + i) for i, (w, b) in enumerate(ws)], act)
    torch.testing.assert_close(fused(x, *ad), ref)


def test_qkv_gradcheck_fp64():
    from fastlm.kernels.lora import Adapter, BaseWeight, fused_lora_qkv

    torch.manual_seed(0)
    ws = [torch.randn(o, 10, dtype=torch.float64) for o in (10, 4, 4)]
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    ad = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((2, 10), (10, 2), (3, 10), (4, 3),
                                                                             (2, 10), (4, 2))]

    def fused(x, *ab):
        return fused_lora_qkv(x, [BaseWeight(w) for w in ws], [Adapter(ab[2 * i], ab[2 * i + 1], 2.0 - i)
                                                               for i in range(3)])

    assert torch.autograd.gradcheck(fused, (x, *ad))
    for out, w, i in zip(fused(x, *ad), ws, range(3)):
        torch.testing.assert_close(out, lora_linear_reference(x, w, None, ad[2 * i], ad[2 * i + 1], 2.0 - i))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_triton_mlp_matches_reference(act, dtype):
    """The MLP function with its Triton activation kernels (interpreter) vs the autograd reference."""
    pytest.importorskip("triton")
    mod = lora_module()
    torch.manual_seed(0)
    ws = [(torch.randn(o, i) / i ** 0.5).to(dtype) for i, o in ((H, I), (H, I), (I, H))]
    x = torch.randn(3, 37, H).to(dtype)  # 3 * 37 * 80 elements: not a multiple of the kernels' block
    ad = [(torch.randn(s) * 0.3) for s in ((4, H), (I, 4), (4, H), (I, 4), (4, I), (H, 4))]
    dy = torch.randn(3, 37, H).to(dtype)

    def run(fn):
        leaves = [x.clone().requires_grad_()] + [a.clone().requires_grad_() for a in ad]
        out = fn(*leaves)
        out.backward(dy)
        return [out.float()] + [t.grad.float() for t in leaves]

    def fused(x, *ab):
        adapters = tuple(mod.Adapter(ab[2 * i], ab[2 * i + 1], 2.0) for i in range(3))
        return mod.fused_lora_mlp(x, *(mod.BaseWeight(w) for w in ws), adapters, act)

    def ref(x, *ab):
        return lora_mlp_reference(x, *[(w, None, ab[2 * i], ab[2 * i + 1], 2.0) for i, w in enumerate(ws)], act)

    with mod.force_triton():
        got = run(fused)
    _assert_match(got, run(ref), dtype)


def _saved_bytes(fn, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size() if not isinstance(t, nn.Parameter) else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total[0]


def test_mlp_saves_less_than_peft():
    """The memory a user notices: activations kept for the backward of one LoRA MLP (bf16 model, fp32 adapters)."""
    from fastlm.kernels.lora import fused_lora_mlp

    block = peft_block(torch.bfloat16)
    mlp = block.mlp
    parts = [lora_parts(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    x = torch.randn(4, 64, H, dtype=torch.bfloat16, requires_grad=True)
    peft_bytes = _saved_bytes(mlp, x)
    fused_bytes = _saved_bytes(lambda t: fused_lora_mlp(t, *(p[0] for p in parts), tuple(p[1] for p in parts),
                                                        "silu"), x)
    tokens = 4 * 64
    # fused: x, gate, up (bf16) and three N x r products (bf16), nothing else
    assert fused_bytes == tokens * (H + 2 * I + 3 * 4) * 2
    assert fused_bytes < 0.35 * peft_bytes, (fused_bytes, peft_bytes)


def test_autocast_matches_peft():
    """fp32 model under bf16 autocast (TRL's bf16=True on an fp32 model): the fused MLP computes in bf16 like
    PEFT, returns bf16, and gives fp32 gradients to x and the adapters."""
    from fastlm.kernels.lora import fused_lora_mlp

    block = peft_block(torch.float32)
    mlp = block.mlp
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    parts = [lora_parts(m) for m in layers]
    x = torch.randn(2, 9, H)
    params = _adapter_params(*layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _run(mlp, x, params)
        with torch.no_grad():
            assert mlp(x).dtype == torch.bfloat16
            assert fused_lora_mlp(x, *(p[0] for p in parts), tuple(p[1] for p in parts), "silu").dtype == \
                torch.bfloat16
        got = _run(lambda t: fused_lora_mlp(t, *(p[0] for p in parts), tuple(p[1] for p in parts), "silu"), x,
                   params)
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, atol=3e-2 * max(1.0, w.abs().max().item()), rtol=3e-2)


def test_frozen_inputs_get_no_gradient():
    """x without grad (first layer, no input grads) and a frozen adapter: the others' gradients are unchanged."""
    from fastlm.kernels.lora import Adapter, BaseWeight, fused_lora_mlp

    torch.manual_seed(0)
    ws = [torch.randn(o, i) / i ** 0.5 for i, o in ((H, I), (H, I), (I, H))]
    x = torch.randn(5, H)
    ad = [torch.randn(s) * 0.3 for s in ((4, H), (I, 4), (4, H), (I, 4), (4, I), (H, 4))]
    frozen = {0, 4}  # A of gate and A of down

    def run(fn):
        leaves = [a.clone().requires_grad_(i not in frozen) for i, a in enumerate(ad)]
        fn(x, *leaves).square().sum().backward()
        return [t.grad for t in leaves]

    got = run(lambda x, *ab: fused_lora_mlp(x, *(BaseWeight(w) for w in ws),
                                            tuple(Adapter(ab[2 * i], ab[2 * i + 1], 2.0) for i in range(3)), "silu"))
    want = run(lambda x, *ab: lora_mlp_reference(x, *[(w, None, ab[2 * i], ab[2 * i + 1], 2.0)
                                                      for i, w in enumerate(ws)], "silu"))
    for i, (g, w) in enumerate(zip(got, want)):
        if i in frozen:
            assert g is None and w is None
        else:
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
