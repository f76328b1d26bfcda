"""The fused-weight path (the CUDA default) computes what the module path computes, LoRA and biases included."""
import pytest
import torch

from fastlm.inference.engine import Engine


def _greedy_steps(eng, prompts, n):
    """Prefill the prompts into slots 0.., then n greedy decode steps: their logits stacked [n, B, V]."""
    first = eng.prefill(list(range(len(prompts))), prompts)
    tok_ids, pos, outs = first.argmax(-1), torch.tensor([len(p) for p in prompts]), []
    for _ in range(n):
        out = eng.decode(tok_ids, pos)
        outs.append(out.clone())
        tok_ids, pos = out.argmax(-1), pos + 1
    return torch.stack(outs)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "qwen2"])
def test_fused_projections_equal_module_calls(tiny_model_factory, loaded, model_type):
    model, tok = loaded(tiny_model_factory(model_type), lora=True)
    prompts = [tok("the cat is red")["input_ids"], tok("one")["input_ids"]]
    outs = []
    for fuse in (False, True):
        eng = Engine(model, max_slots=2, max_len=32, fuse=fuse)
        assert eng.view.fused is fuse
        first = eng.prefill([0, 1], prompts)
        step = eng.decode(first.argmax(-1), torch.tensor([len(p) for p in prompts]))
        outs.append((first, step))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_family_is_refused_with_a_reason(tiny_model_factory):
    from transformers import AutoModelForCausalLM, GPT2Config

    from fastlm.inference.engine import UnsupportedModelError

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'"):
        Engine(model)


def test_fused_adapters_follow_training_updates(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("llama"), lora=True)
    prompt = [tok("the cat is red")["input_ids"]]
    fused = Engine(model, max_slots=1, max_len=32, fuse=True)
    before = fused.prefill([0], prompt)
    with torch.no_grad():  # an optimizer step changes the adapter in place
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    fused.view.refresh_adapters()  # what every Scheduler does before decoding
    after = fused.prefill([0], prompt)
    reference = Engine(model, max_slots=1, max_len=32, fuse=False).prefill([0], prompt)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["gemma2"])  # softcap, sliding window, sandwich norms; ~30 s of compile
def test_compiled_decode_step_equals_the_eager_step(tiny_model_factory, loaded, model_type):
    """The compiled step (what CUDA graphs capture) writes the LoRA up-projection and the one-query attention as
    products and sums; its logits must equal the eager step's, with the adapter's A rows inside the base weight."""
    model, tok = loaded(tiny_model_factory(model_type, num_hidden_layers=4), lora=True)
    prompts = [tok("the cat is red")["input_ids"], tok("one")["input_ids"]]
    from torch._dynamo.utils import counters

    steps = []
    graphs_before = counters["stats"]["unique_graphs"]
    for compiled in (False, True):
        eng = Engine(model, max_slots=2, max_len=32, fuse=True, compile=compiled, cuda_graphs=False)
        assert any(p.a_rows for p in eng.view.projections)
        steps.append(_greedy_steps(eng, prompts, 3))
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-4)
    # one layer's code serves every layer: a graph per attention kind (sliding / global) and one for the head,
    # not one per layer (the warm-up on a GPU would grow with the depth)
    n_layers = len(eng.view.layers)
    assert n_layers == 4 and counters["stats"]["unique_graphs"] - graphs_before <= 3


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_decode_attention_kernel_in_the_engine_equals_the_matmul_path(tiny_model_factory, loaded, model_type,
                                                                     monkeypatch):
    """On a GPU the decode step's attention is the Triton kernel; here it runs under the interpreter and must give
    the logits of the matmul path (GQA; Gemma 2's soft-cap and sliding window)."""
    from fastlm.inference import decoder
    from fastlm.kernels._triton import force_triton

    calls = []
    kernel_call = decoder.decode_attention
    monkeypatch.setattr(decoder, "decode_attention", lambda *a: calls.append(1) or kernel_call(*a))

    model, tok = loaded(tiny_model_factory(model_type), lora=True)
    prompts = [tok("the cat is red and the dog is blue")["input_ids"], tok("one")["input_ids"]]
    runs = []
    for forced in (False, True):
        eng = Engine(model, max_slots=2, max_len=32, fuse=True)
        first = eng.prefill([0, 1], prompts)
        tok_ids, pos, outs = first.argmax(-1), torch.tensor([len(p) for p in prompts]), []
        for _ in range(3):
            if forced:
                with force_triton():
                    out = eng.decode(tok_ids, pos)
            else:
                out = eng.decode(tok_ids, pos)
            outs.append(out.clone())
            tok_ids, pos = out.argmax(-1), pos + 1
        runs.append(torch.stack(outs))
        assert len(calls) == (3 * len(eng.view.layers) if forced else 0)
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)


def test_compiled_step_with_the_attention_kernel_op_equals_the_eager_step(tiny_model_factory, loaded, monkeypatch):
    """The variant scripts/gpu_engine_profile.py measures ("lora16+kernel"): the Triton decode attention inside the
    compiled step as the fastlm::decode_attention op (interpreter here) gives the eager step's logits."""
    import torch._dynamo

    from fastlm.inference import decoder
    from fastlm.kernels._triton import force_triton

    model, tok = loaded(tiny_model_factory("gemma2"), lora=True)
    prompts = [tok("the cat is red")["input_ids"], tok("one")["input_ids"]]
    monkeypatch.setattr(decoder, "COMPILED_DECODE_ATTENTION", "kernel")
    torch._dynamo.reset()
    steps = []
    with force_triton():
        for compiled in (False, True):
            eng = Engine(model, max_slots=2, max_len=32, fuse=True, compile=compiled, cuda_graphs=False)
            first = eng.prefill([0, 1], prompts)
            steps.append(eng.decode(first.argmax(-1), torch.tensor([len(p) for p in prompts])))
    torch._dynamo.reset()
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_ms, expected", [(0.5, "kernel"), (2.0, "sum"), (None, "sum")])
def test_the_first_bucket_picks_the_faster_compiled_attention_for_all(tiny_model_factory, loaded, monkeypatch,
                                                                      kernel_ms, expected):
    """On a GPU the first bucket is captured with products and sums and again with the Triton op; the faster replay
    is kept, a failed second capture keeps the first, and later buckets are captured once, with the same form (one
    numerics for every batch size). CPU here: captures and timings stubbed."""
    model, _ = loaded(tiny_model_factory("llama"))
    eng = Engine(model, max_slots=4, max_len=32, fuse=True, compile=True, cuda_graphs=False)
    captures = []

    def capture(fn, tok, pos):
        captures.append(eng.view.compiled_attention)
        if kernel_ms is None:
            raise RuntimeError("capture failed")
        return ("graph-kernel", tok, pos, None)

    monkeypatch.setattr(eng, "_graph_capture", capture)
    monkeypatch.setattr(eng, "_replay_ms", lambda captured, b: 1.0 if captured[0] == "graph-sum" else kernel_ms)
    eng.view.compiled_attention = "sum"
    zeros = torch.zeros(2, dtype=torch.long)
    kept = eng._pick_attention(2, zeros, zeros, ("graph-sum", None, None, None))
    assert captures == ["kernel"]  # the second capture is made with the kernel op
    assert kept[0] == f"graph-{expected}"
    assert eng.view.compiled_attention == expected
    first = (f"graph-{expected}", None, None, None)
    assert eng._pick_attention(4, zeros, zeros, first) is first and captures == ["kernel"]
    assert eng.view.compiled_attention == expected


@pytest.mark.parametrize("model_type,lora", [("llama", True), ("qwen2", True), ("gemma", False), ("llama", False)])
def test_fused_decode_epilogues_equal_the_unfused_step(tiny_model_factory, loaded, model_type, lora, monkeypatch):
    """On a GPU a decode layer's adapters, RoPE, cache write, residual, norm and activation run in three fused
    kernels (kernels/decode_epilogue.py); here under the interpreter. Logits over several steps must equal the
    unfused step's (LoRA with q/k/v biases for Qwen2, Gemma's (1 + w) norm and GELU), with the same cache."""
    from fastlm.inference import decoder
    from fastlm.kernels._triton import force_triton

    model, tok = loaded(tiny_model_factory(model_type), lora=lora)
    prompts = [tok("the cat is red and the dog is blue")["input_ids"], tok("one")["input_ids"]]
    calls = []
    fused_layer = decoder.DecoderView._decode_layer
    monkeypatch.setattr(decoder.DecoderView, "_decode_layer", lambda *a: calls.append(1) or fused_layer(*a))
    runs, caches = [], []
    for epilogues in (False, True):
        monkeypatch.setattr(decoder, "EPILOGUE_MAX_ROWS", 4 if epilogues else 0)
        eng = Engine(model, max_slots=2, max_len=32, fuse=True)
        assert all(lv.epilogue is not None for lv in eng.view.layers)
        with force_triton():
            runs.append(_greedy_steps(eng, prompts, 3))
        caches.append(torch.stack(eng.cache.k + eng.cache.v))
    assert len(calls) == 3 * len(eng.view.layers)
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1], caches[0], rtol=1e-5, atol=1e-5)


def test_layers_the_epilogues_cannot_compute_keep_the_unfused_step(tiny_model_factory, loaded):
    """q/k-norm (Qwen3) and sandwich norms (Gemma 2) are not in the fused kernels: those layers keep the plain step."""
    for model_type in ("qwen3", "gemma2"):
        model, _ = loaded(tiny_model_factory(model_type), lora=True)
        eng = Engine(model, max_slots=1, max_len=16, fuse=True)
        assert all(lv.epilogue is None for lv in eng.view.layers)


def test_compiled_step_with_the_epilogue_ops_equals_the_eager_step(tiny_model_factory, loaded):
    """Inside the compiled step (what CUDA graphs capture) the epilogues are opaque ops, the cache write declared
    as an in-place mutation: the compiled step's logits and cache must equal the eager step's."""
    import torch._dynamo

    from fastlm.kernels._triton import force_triton

    model, tok = loaded(tiny_model_factory("llama", num_hidden_layers=2), lora=True)
    prompts = [tok("the cat is red")["input_ids"], tok("one")["input_ids"]]
    torch._dynamo.reset()
    steps, caches = [], []
    with force_triton():
        for compiled in (False, True):
            eng = Engine(model, max_slots=2, max_len=32, fuse=True, compile=compiled, cuda_graphs=False)
            steps.append(_greedy_steps(eng, prompts, 2))
            caches.append(torch.stack(eng.cache.k + eng.cache.v))
    torch._dynamo.reset()
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1], caches[0], rtol=1e-5, atol=1e-5)


def test_epilogues_with_adapters_of_different_ranks(tiny_model_factory, loaded, monkeypatch):
    """k_proj's adapter has another rank than q/v's (PEFT rank_pattern): the epilogues read a block-diagonal B^T
    (no shared rows) and still give the unfused step's logits."""
    import peft

    from fastlm.inference import decoder
    from fastlm.kernels._triton import force_triton

    model, tok = loaded(tiny_model_factory("llama"))
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, rank_pattern={"k_proj": 2}, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    model = peft.get_peft_model(model, config).eval()
    prompts = [tok("the cat is red and the dog is blue")["input_ids"], tok("one")["input_ids"]]
    runs = []
    for epilogues in (False, True):
        monkeypatch.setattr(decoder, "EPILOGUE_MAX_ROWS", 4 if epilogues else 0)
        eng = Engine(model, max_slots=2, max_len=32, fuse=True)
        qkv = eng.view.layers[0].qkv
        assert not qkv.compact and eng.view.layers[0].gate_up.compact
        with force_triton():
            runs.append(_greedy_steps(eng, prompts, 2))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
