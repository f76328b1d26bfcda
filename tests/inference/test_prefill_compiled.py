"""The compiled prefill (the CUDA default): one compile with the token dimension dynamic serves every prompt length,
padded short prompts leave nothing that later steps attend to, and a failed compile falls back to the eager prefill.
CPU here: `compile_prefill=True` forces it; most tests count compiles with aot_eager, one runs inductor."""
import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastlm.inference import engine as engine_mod
from fastlm.inference.engine import Engine
from fastlm.inference.sampling import SamplingParams
from fastlm.inference.scheduler import Request, Scheduler

BATCHES = [[3], [20], [5, 17], [1], [9, 9, 30], [31], [16, 2], [4, 8, 2, 25]]  # max_len 32: 31 is the longest compiled prompt


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed + sum(lengths))
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def counting_backend(monkeypatch):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(engine_mod, "PREFILL_BACKEND", counter)
    yield counter
    torch._dynamo.reset()


def test_one_compile_serves_every_prompt_length_with_the_eager_logits(tiny_model_factory, loaded, counting_backend):
    model, _ = loaded(tiny_model_factory("llama"), lora=True)
    compiled = Engine(model, max_slots=4, max_len=32, fuse=True, compile_prefill=True)
    eager = Engine(model, max_slots=4, max_len=32, fuse=True)
    assert compiled.use_prefill_compile and not eager.use_prefill_compile  # CPU default: eager
    counts = []
    for lengths in BATCHES:
        prompts = _prompts(lengths)
        slots = list(range(len(prompts)))
        torch.testing.assert_close(compiled.prefill(slots, prompts), eager.prefill(slots, prompts),
                                   rtol=1e-5, atol=1e-5)
        counts.append(counting_backend.frame_count)
    assert compiled.use_prefill_compile  # no fallback happened
    # layer + head for one prompt, and once more for batches (the batch dimension is dynamic from two prompts
    # on): every later length and batch size reuses them
    assert counts[0] == 2 and counts[2] == 4 and counts[-1] == 4, counts


def test_padded_positions_are_never_attended_later(tiny_model_factory, loaded, counting_backend):
    """A 3-token prompt is prefilled over 16 positions (pads written into the slot's cache after the prompt); the
    decode steps that follow give the logits of an engine that wrote only the prompt."""
    model, _ = loaded(tiny_model_factory("qwen3"), lora=True)
    outs = []
    for compile_prefill in (True, False):
        eng = Engine(model, max_slots=2, max_len=32, fuse=True, compile_prefill=compile_prefill)
        prompts = _prompts([3, 7])
        logits = eng.prefill([0, 1], prompts)
        tok, pos, steps = logits.argmax(-1), torch.tensor([3, 7]), [logits]
        for _ in range(6):
            out = eng.decode(tok, pos)
            steps.append(out.clone())
            tok, pos = out.argmax(-1), pos + 1
        outs.append(torch.stack(steps))
    assert 7 < engine_mod.PREFILL_MIN_TOKENS and counting_backend.frame_count > 0  # both rows padded, compiled
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_greedy_tokens_of_the_compiled_prefill_equal_the_eager_ones(tiny_model_factory, loaded, counting_backend):
    model, _ = loaded(tiny_model_factory("gemma2"))  # soft-caps, sliding window, sandwich norms
    prompts = _prompts([4, 11, 2, 19], seed=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = []
    for compile_prefill in (True, False):
        eng = Engine(model, max_slots=2, max_len=48, fuse=True, compile_prefill=compile_prefill)
        sched = Scheduler(eng)  # 4 prompts over 2 slots: prefills of one and of two prompts, slots reused
        for i, p in enumerate(prompts):
            sched.add(Request(p, params, tag=i))
        tokens.append([r.token_ids for r in sorted(sched.run_all(), key=lambda r: r.request.tag)])
    assert tokens[0] == tokens[1] and all(len(t) == 10 for t in tokens[0])
    assert len({t for row in tokens[0] for t in row}) > 4  # real continuations, not one repeated token


def test_warmup_compiles_the_prefill_and_keeps_the_cache(tiny_model_factory, loaded, counting_backend):
    model, _ = loaded(tiny_model_factory("llama"))
    eng = Engine(model, max_slots=4, max_len=32, fuse=True, compile_prefill=True)
    for c in eng.cache.k + eng.cache.v:  # what live sequences would have written
        c.normal_()
    kept = [c.clone() for c in eng.cache.k + eng.cache.v]
    eng.warmup([1, 4])
    assert counting_backend.frame_count == 4  # layer + head, for one prompt and for batches
    for c, before in zip(eng.cache.k + eng.cache.v, kept):
        assert torch.equal(c, before)
    for lengths in ([6], [3, 12], [7, 7, 7], [2, 30, 4, 9]):
        eng.prefill(list(range(len(lengths))), _prompts(lengths))
    assert counting_backend.frame_count == 4  # nothing left to compile for any prompt length or batch size
    assert eng.warmup_seconds > 0


def test_a_failing_compile_is_reported_once_and_prefills_eagerly(tiny_model_factory, loaded, monkeypatch, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    monkeypatch.setattr(engine_mod, "PREFILL_BACKEND", broken)
    model, _ = loaded(tiny_model_factory("llama"))
    eng = Engine(model, max_slots=2, max_len=32, fuse=True, compile_prefill=True)
    eager = Engine(model, max_slots=2, max_len=32, fuse=True)
    with caplog.at_level(logging.WARNING, logger="fastlm.inference.engine"):
        for lengths in ([4], [6, 2]):
            prompts = _prompts(lengths)
            slots = list(range(len(prompts)))
            torch.testing.assert_close(eng.prefill(slots, prompts), eager.prefill(slots, prompts))
    notices = [r for r in caplog.records if "compiled prefill failed" in r.getMessage()]
    assert len(notices) == 1 and "no compiler here" in notices[0].getMessage()
    assert not eng.use_prefill_compile
    torch._dynamo.reset()


def test_compile_prefill_rejects_other_values(tiny_model_factory, loaded):
    model, _ = loaded(tiny_model_factory("llama"))
    with pytest.raises(ValueError, match="compile_prefill='yes'"):
        Engine(model, max_slots=1, max_len=32, compile_prefill="yes")


def test_inductor_prefill_equals_eager(tiny_model_factory, loaded):
    """The real backend (C++ inductor on CPU, ~30 s): a batch of mixed lengths, then other lengths, one compile."""
    torch._dynamo.reset()
    model, _ = loaded(tiny_model_factory("llama"), lora=True)
    compiled = Engine(model, max_slots=3, max_len=40, fuse=True, compile_prefill=True)
    eager = Engine(model, max_slots=3, max_len=40, fuse=True)
    for lengths in ([5, 17, 2], [33, 1, 9]):
        prompts = _prompts(lengths)
        torch.testing.assert_close(compiled.prefill([0, 1, 2], prompts), eager.prefill([0, 1, 2], prompts),
                                   rtol=1e-4, atol=1e-4)
    assert compiled.use_prefill_compile
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3", "qwen2"])
def test_other_families_prefill_compiled_equals_eager(tiny_model_factory, loaded, counting_backend, model_type):
    """Per-layer-type RoPE and sliding layers (Gemma 3), partial rotary (Phi-3), q/k/v biases (Qwen2)."""
    model, _ = loaded(tiny_model_factory(model_type), lora=True)
    compiled = Engine(model, max_slots=2, max_len=32, fuse=True, compile_prefill=True)
    eager = Engine(model, max_slots=2, max_len=32, fuse=True)
    prompts = _prompts([21, 6])
    torch.testing.assert_close(compiled.prefill([0, 1], prompts), eager.prefill([0, 1], prompts),
                               rtol=1e-5, atol=1e-5)
    assert compiled.use_prefill_compile and counting_backend.frame_count >= 2
