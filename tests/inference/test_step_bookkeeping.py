"""The fused per-token bookkeeping (the scheduler's `_commit` compiled, what the whole-step CUDA graph captures on a
GPU) writes exactly the state the eager one writes: tokens, output buffer, counts, done flags, positions, penalty
records. CPU here: inductor's C++ backend for the function itself, and the scheduler forced onto the fused path."""
import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastlm.inference import scheduler as sched_mod
from fastlm.inference.engine import Engine
from fastlm.inference.sampling import SamplingParams
from fastlm.inference.scheduler import Request, Scheduler

V, CAP = 50, 12


def _state(penalties: bool):
    """Four slots: 0 about to hit its EOS id 7, 1 at its max_new of 4 after this token, 2 already done, 3 with
    its output buffer full (the write lands in the last column)."""
    g = torch.Generator().manual_seed(1)
    return dict(pos=torch.tensor([10, 11, 12, 30]), cur=torch.tensor([5, 6, 24, 8]),
                n_gen=torch.tensor([0, 3, 11, 12]), gen=torch.randint(0, V, (4, CAP), generator=g),
                max_new=torch.tensor([5, 4, 20, 20]), done=torch.tensor([False, False, True, False]),
                eos=torch.tensor([[7, -1], [-1, -1], [3, 9], [1, 2]]),
                seen=torch.zeros(4, V, dtype=torch.bool) if penalties else None,
                counts=torch.zeros(4, V) if penalties else None)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling+penalties"])
def test_compiled_commit_writes_the_eager_state(sampling):
    torch._dynamo.reset()
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    logits[0, 7], logits[1, 40], logits[3, 9] = 50.0, 50.0, 50.0  # greedy picks: EOS of slot 0, 40, -, 9
    drawn, temp = (torch.tensor([11, 12, 13, 14]), torch.tensor([0.0, 0.8, 0.0, 1.2])) if sampling else (None, None)
    rows = torch.arange(4)
    runs = []
    for fn in (sched_mod._commit, sched_mod._compiled_commit()):
        st = _state(sampling)
        tok, idx = fn(logits, drawn, temp, rows, None, st["pos"], st["cur"], st["n_gen"], st["gen"], st["max_new"],
                      st["done"], st["eos"], st["seen"], st["counts"])
        runs.append((tok, idx, st))
    (tok, idx, st), (tok_c, idx_c, st_c) = runs
    assert torch.equal(tok, tok_c) and torch.equal(idx, idx_c)
    for name, value in st.items():
        assert (value is None and st_c[name] is None) or torch.equal(value, st_c[name]), name
    # what a user sees: slot 0 stops on its EOS (greedy) or takes the argmax at temperature 0, slot 1 sampled
    # (drawn 12) or greedy (40) and done at max_new, slot 2 untouched, slot 3 written into the last column
    expect = [7, 12 if sampling else 40, 24, 14 if sampling else 9]
    assert tok.tolist() == expect and idx.tolist() == [0, 3, 11, 11]
    assert st_c["done"].tolist() == [True, True, True, False]
    assert st_c["n_gen"].tolist() == [1, 4, 11, 13] and st_c["pos"].tolist() == [11, 12, 12, 31]
    assert st_c["gen"][0, 0] == 7 and st_c["gen"][3, 11] == expect[3]
    if sampling:
        assert st_c["seen"].sum() == 3 and st_c["counts"][1, 12] == 1 and not st_c["seen"][2].any()
    torch._dynamo.reset()


def _run(model, requests, fused):
    eng = Engine(model, max_slots=4, max_len=64, fuse=True)
    sched = Scheduler(eng, sync_every=4)
    sched.state.fused_bookkeeping = fused
    for i, (prompt, params, eos) in enumerate(requests):
        sched.add(Request(prompt, params, eos_ids=eos, tag=i))
    return sorted(sched.run_all(), key=lambda r: r.request.tag)


def test_fused_scheduler_gives_the_eager_tokens(tiny_model_factory, loaded, monkeypatch):
    """Greedy, seeded sampling with every penalty and min_tokens, logprobs and an EOS stop, in one batch: the fused
    bookkeeping gives the same tokens, finish reasons and log-probabilities (compiled with aot_eager here: the
    inductor code of the same function is compared above)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(sched_mod, "BOOKKEEPING_BACKEND", counter)
    model, tok = loaded(tiny_model_factory("llama"))  # (the tiny model with a random adapter repeats one token)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    free = _run(model, [(tok("the cat is")["input_ids"], greedy, [])], fused=False)[0].token_ids
    requests = [
        (tok("the cat is")["input_ids"], greedy, [free[3]]),  # stops at the first of that token
        (tok("one two three")["input_ids"], SamplingParams(temperature=1.1, top_k=20, top_p=0.9, min_p=0.02, seed=5,
                                                         max_tokens=10, repetition_penalty=1.2, presence_penalty=0.4,
                                                         frequency_penalty=0.3, min_tokens=3, logprobs=2), [2]),
        (tok("red")["input_ids"], SamplingParams(temperature=0, max_tokens=7, logprobs=1), []),
        (tok("blue river")["input_ids"], SamplingParams(temperature=0.9, seed=11, max_tokens=9), []),
    ]
    eager = _run(model, requests, fused=False)
    fused = _run(model, requests, fused=True)
    assert counter.frame_count > 0  # the fused path ran compiled
    for a, b in zip(eager, fused):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == b.logprobs
    assert len(set(free)) > 3 and fused[0].finish_reason == "stop"
    assert fused[0].token_ids == free[:free.index(free[3]) + 1]
    assert [len(r.token_ids) for r in fused[1:]] == [len(r.token_ids) for r in eager[1:]]
    assert fused[2].finish_reason == "length" and len(fused[2].token_ids) == 7
    torch._dynamo.reset()


def test_a_failing_bookkeeping_compile_is_reported_once_and_runs_eagerly(tiny_model_factory, loaded, monkeypatch,
                                                                        caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    monkeypatch.setattr(sched_mod, "BOOKKEEPING_BACKEND", broken)
    model, tok = loaded(tiny_model_factory("llama"))
    requests = [(tok(p)["input_ids"], SamplingParams(temperature=0, max_tokens=9), []) for p in ("red", "one two")]
    eager = _run(model, requests, fused=False)
    with caplog.at_level(logging.WARNING, logger="fastlm.inference.scheduler"):
        fused = _run(model, requests, fused=True)
    notices = [r for r in caplog.records if "token bookkeeping failed" in r.getMessage()]
    assert len(notices) == 1 and "no compiler here" in notices[0].getMessage()
    assert [r.token_ids for r in fused] == [r.token_ids for r in eager]
    assert all(len(r.token_ids) == 9 for r in fused)
    torch._dynamo.reset()
