"""The captured prefill (CUDA graphs, the CUDA default for short prompts), checked on CPU with a capture that re-runs
the prefill eagerly at each replay over the same static inputs: a graph reads its inputs only through those
tensors, so a replay that forgot to refresh one of them (tokens, slots, last position) answers for the wrong
prompt here as it would on the GPU. Generation through the captured prefill must give the eager engine's tokens."""
import logging
import weakref

import pytest
import torch

from fastlm.inference.engine import Engine
from fastlm.inference.prefill_graphs import WIDTHS, PrefillGraphs, graph_width
from fastlm.inference.sampling import SamplingParams
from fastlm.inference.scheduler import Request, Scheduler


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed + sum(lengths))
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


class EagerCapture:
    """A stand-in for a CUDA graph capture: replay runs the captured function again, on the same input tensors,
    into its output buffer. Like a real graph it holds its inputs only by address (here weakly): a replay after
    the caller let one go fails, where a graph would read freed memory."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def __call__(self, fn, inputs, pool):
        self.captures += 1
        refs = [weakref.ref(t) for t in inputs]
        out = fn(*inputs)

        def replay():
            self.replays += 1
            live = [r() for r in refs]
            assert all(t is not None for t in live), "a captured input was freed before a replay"
            out.copy_(fn(*live))
        return replay, out


def _captured_engine(model, capture, **kw):
    eng = Engine(model, fuse=True, **kw)
    eng._prefill_graphs = PrefillGraphs(eng.device, eng._prefill_forward, capture=capture)
    return eng


def test_graph_width_pads_to_the_next_width_and_leaves_long_or_many_prompts_eager():
    assert graph_width(1, 1, 4096) == WIDTHS[0]
    assert graph_width(1, 129, 4096) == 192 and graph_width(2, 128, 4096) == 128
    assert graph_width(1, 100, 110) == 110  # never past the cache
    assert graph_width(1, WIDTHS[-1] + 1, 4096) is None
    assert graph_width(5, 10, 4096) is None
    assert graph_width(2, 512, 4096) == 512 and graph_width(2, 513, 4096) is None  # 1,536 padded tokens: eager


def test_replayed_prefills_give_each_prompt_its_own_logits(tiny_model_factory, loaded):
    model, _ = loaded(tiny_model_factory("llama"), lora=True)
    capture = EagerCapture()
    graphs = _captured_engine(model, capture, max_slots=4, max_len=48)
    eager = Engine(model, max_slots=4, max_len=48, fuse=True, cuda_graphs=False)
    # (slots, lengths): the second of each pair replays the first's graph with other tokens, slots and lengths
    for slots, lengths in [([0], [5]), ([2], [9]), ([1, 3], [20, 30]), ([3, 0], [31, 17]), ([1], [40])]:
        prompts = _prompts(lengths)
        torch.testing.assert_close(graphs.prefill(slots, prompts), eager.prefill(slots, prompts),
                                   atol=2e-5, rtol=1e-4)
    assert capture.captures == 3 and capture.replays == 2  # widths 16, 32 (two prompts) and 48 (the cache)
    for c_g, c_e in zip(graphs.cache.k + graphs.cache.v, eager.cache.k + eager.cache.v):
        torch.testing.assert_close(c_g[1, :, :40], c_e[1, :, :40], atol=2e-5, rtol=1e-4)  # slot 1's last prompt


def test_generation_through_captured_prefills_equals_eager(tiny_model_factory, loaded):
    model, _ = loaded(tiny_model_factory("llama"), lora=True)
    capture = EagerCapture()
    outs = []
    for eng in (_captured_engine(model, capture, max_slots=2, max_len=48),
                Engine(model, max_slots=2, max_len=48, fuse=True, cuda_graphs=False)):
        sched = Scheduler(eng)  # 5 prompts over 2 slots: admissions of one and of two prompts, slots reused
        for i, p in enumerate(_prompts([3, 11, 7, 14, 2])):
            sched.add(Request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), tag=i))
        outs.append([r.token_ids for r in sorted(sched.run_all(), key=lambda r: r.request.tag)])
    assert capture.replays > 0
    assert outs[0] == outs[1]


def test_a_failed_capture_is_reported_once_and_prefills_eagerly(tiny_model_factory, loaded, caplog):
    model, _ = loaded(tiny_model_factory("llama"))

    def broken(fn, inputs, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    eng = _captured_engine(model, broken, max_slots=2, max_len=32)
    eager = Engine(model, max_slots=2, max_len=32, fuse=True, cuda_graphs=False)
    with caplog.at_level(logging.WARNING, logger="fastlm.inference.prefill_graphs"):
        for lengths in ([4], [6], [10]):
            prompts = _prompts(lengths)
            torch.testing.assert_close(eng.prefill([0], prompts), eager.prefill([0], prompts), atol=2e-5, rtol=1e-4)
    assert not eng._prefill_graphs.enabled
    warnings = [r for r in caplog.records if "could not be captured" in r.getMessage()]
    assert len(warnings) == 1 and "prefilling eagerly" in warnings[0].getMessage()


@pytest.mark.parametrize("cuda_graphs", [None, False])
def test_cpu_engines_prefill_eagerly(tiny_model_factory, loaded, cuda_graphs):
    model, _ = loaded(tiny_model_factory("llama"))
    assert not Engine(model, max_slots=1, max_len=32, cuda_graphs=cuda_graphs)._prefill_graphs.enabled
