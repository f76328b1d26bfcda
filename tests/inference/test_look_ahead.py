"""The scheduler's look-ahead (the CUDA default): the next steps are queued before the host reads the last ones' stop
flags. The tokens, finish reasons and log-probabilities must be exactly those of syncing after every round, for
sequences that stop on EOS, on their length or on a stop string, with more requests than slots, and for a second
batch of requests after the first has finished (steps queued for finished sequences must not count for new ones).
CPU here: `look_ahead=True` forces it."""
import torch

from fastlm.inference.engine import Engine
from fastlm.inference.sampling import SamplingParams
from fastlm.inference.scheduler import Request, Scheduler


def _requests(tok, stop_id):
    greedy = SamplingParams(temperature=0, max_tokens=17)
    return [
        Request(tok("the cat is")["input_ids"], greedy, eos_ids=[stop_id], tag=0),
        Request(tok("one two three")["input_ids"], SamplingParams(temperature=0.8, seed=3, max_tokens=11,
                                                                  logprobs=1), tag=1),
        Request(tok("red")["input_ids"], SamplingParams(temperature=0, max_tokens=2), tag=2),
        Request(tok("blue river")["input_ids"], SamplingParams(temperature=0, max_tokens=23), tag=3),
        Request(tok("green")["input_ids"], SamplingParams(temperature=0, max_tokens=9, stop=["zz"]), tag=4),
    ]


def _run(sched, requests):
    for r in requests:
        sched.add(r)
    return [(r.token_ids, r.finish_reason, r.logprobs) for r in sorted(sched.run_all(), key=lambda r: r.request.tag)]


def test_look_ahead_gives_the_tokens_of_syncing_every_round(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("llama"))
    free = _run(Scheduler(Engine(model, max_slots=2, max_len=64), tok, look_ahead=False),
                [Request(tok("the cat is")["input_ids"], SamplingParams(temperature=0, max_tokens=12))])[0][0]
    assert len(set(free)) > 3
    stop_id = free[5]
    outs = []
    for look_ahead in (False, True):
        sched = Scheduler(Engine(model, max_slots=2, max_len=64), tok, sync_every=3, look_ahead=look_ahead)
        first = _run(sched, _requests(tok, stop_id))  # 5 requests over 2 slots: the queue holds some back
        second = _run(sched, _requests(tok, stop_id)[2:4])  # after everything finished: queued steps are stale
        assert sched.ahead == 0
        outs.append((first, second))
    assert outs[0] == outs[1]
    first = outs[1][0]
    assert first[0][1] == "stop" and first[0][0] == free[:free.index(stop_id) + 1]
    assert [len(t) for t, _, _ in first[2:4]] == [2, 23] and first[3][1] == "length"
    assert outs[1][1] == first[2:4]


def test_look_ahead_queues_steps_only_while_no_request_waits(tiny_model_factory, loaded):
    """With a request waiting for a slot the host syncs every round (a freed slot is refilled at once); once the
    queue is empty, each round queues the next one."""
    model, tok = loaded(tiny_model_factory("llama"))
    sched = Scheduler(Engine(model, max_slots=1, max_len=64), tok, sync_every=4, look_ahead=True)
    for i in range(2):
        sched.add(Request(tok("a b")["input_ids"], SamplingParams(temperature=0, max_tokens=13, ignore_eos=True), tag=i))
    sched.step()
    assert sched.ahead == 0 and sched.pending  # the second request waits
    while sched.pending:
        sched.step()
    sched.step()
    assert sched.ahead > 0
    results = sched.run_all()
    assert [len(r.token_ids) for r in results] == [13, 13]
