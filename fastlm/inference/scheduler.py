"""Continuous batching over the engine's slots.

Requests wait in a queue; a free slot takes the next one (prefill), all occupied slots decode together in the
smallest power-of-two bucket that covers them, and a finished sequence frees its slot for the next prompt.
Token bookkeeping (output buffer, lengths, EOS and length checks) lives on the device; the host looks only every
`sync_every` steps (every step while someone streams), so the token loop itself makes no host sync.

    sched = Scheduler(engine, tokenizer)
    sched.add(Request(prompt_ids=[...], params=SamplingParams(...), eos_ids=[2]))
    results = sched.run_all()          # or: while sched.busy(): sched.step()   (the server's loop)
"""
from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .engine import Engine
from .sampling import Sampler, SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: list[int] = field(default_factory=list)
    on_tokens: Callable[[list[int]], None] | None = None  # streaming: called with each batch of new ids
    tag: Any = None  # the caller's handle
    aborted: bool = False  # set from another thread (client gone): the slot is freed at the next sync


@dataclass
class Result:
    request: Request
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop id or stop string), "length", or "abort"
    stop_str: str | None = None
    logprobs: list[dict[int, float]] | None = None


class _DeviceState:
    """The scheduler's device tensors, kept on the engine between schedulers so that the CUDA graphs of whole
    decode steps (model + sampling + bookkeeping, which read and write these tensors) are captured once."""

    def __init__(self, engine: Engine):
        s, cap, dev = engine.max_slots, engine.max_len, engine.device
        self.cur = torch.zeros(s, dtype=torch.long, device=dev)
        self.pos = torch.zeros(s, dtype=torch.long, device=dev)
        self.n_gen = torch.zeros(s, dtype=torch.long, device=dev)
        self.max_new = torch.ones(s, dtype=torch.long, device=dev)
        self.done = torch.ones(s, dtype=torch.bool, device=dev)
        self.gen = torch.zeros(s, cap, dtype=torch.long, device=dev)
        self.logp = None  # [s, cap, 1 + k] and ids [s, cap, 1 + k], when some request asks for logprobs
        self.logp_ids = None
        self.sampler = Sampler(s, engine.vocab_size, dev)
        self.rows = {}  # bucket -> arange(bucket), persistent for the graphs
        self.graphs = {}  # step key -> captured graph (None: capture failed, decode uncaptured)
        self.owner = None  # weakref to the scheduler using it

    def take(self, scheduler) -> bool:
        if self.owner is not None and self.owner() is not None:
            return False
        self.owner = weakref.ref(scheduler)
        self.done.fill_(True)
        self.n_gen.zero_()
        self.sampler.params.clear()
        self.sampler.generators.clear()
        return True


class Scheduler:
    def __init__(self, engine: Engine, tokenizer=None, sync_every: int = 8):
        self.engine = engine
        engine.view.refresh_adapters()  # adapters may have been trained since the engine was built
        self.tokenizer = tokenizer
        self.sync_every = max(1, int(sync_every))
        s = engine.max_slots
        state = getattr(engine, "_scheduler_state", None)
        if state is None or not state.take(self):  # none yet, or another live scheduler uses it: a private one
            state = _DeviceState(engine)
            state.take(self)
            if getattr(engine, "_scheduler_state", None) is None:
                engine._scheduler_state = state
        self.state = state
        self.cur, self.pos, self.n_gen, self.max_new = state.cur, state.pos, state.n_gen, state.max_new
        self.done, self.gen, self.sampler = state.done, state.gen, state.sampler
        self.slot_req: list[Request | None] = [None] * s
        self.delivered = [0] * s
        self.host_max_new = [1] * s
        self.left = [0] * s  # host bound on the tokens a slot may still produce (as of the last sync)
        self.pending: collections.deque[Request] = collections.deque()
        self.finished: list[Result] = []

    # ---------------------------------------------------------------- public
    def add(self, request: Request) -> None:
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(request.prompt_ids) >= self.engine.max_len:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens leaves no room in the engine's "
                             f"{self.engine.max_len}-token cache; raise max_seq_length or shorten the prompt")
        self.pending.append(request)

    def busy(self) -> bool:
        return bool(self.pending) or any(r is not None for r in self.slot_req)

    def run_all(self) -> list[Result]:
        while self.busy():
            self.step()
        out, self.finished = self.finished, []
        return out

    @torch.no_grad()
    def step(self) -> list[Result]:
        """Admit waiting requests, decode up to sync_every tokens, then retire finished ones. Returns the
        results finished in this step (also kept in `finished`)."""
        self._admit()
        occupied = [i for i, r in enumerate(self.slot_req) if r is not None]
        if not occupied:
            return []
        b = self.engine.bucket(max(occupied) + 1)
        streaming = any(self.slot_req[i].on_tokens is not None for i in occupied)
        n = 1 if streaming else min(self.sync_every, max(self.left[i] for i in occupied))
        rows = self.state.rows.get(b)
        if rows is None:
            rows = self.state.rows[b] = torch.arange(b, device=self.engine.device)
        row_ids = list(range(b))
        key = self._graph_key(b, row_ids)
        for _ in range(n):
            graph = self.state.graphs.get(key) if key is not None else None
            if graph is not None:
                graph.replay()
                continue
            self._decode_once(b, rows, row_ids)
            if key is not None and key not in self.state.graphs:
                self.state.graphs[key] = self.engine.capture_with(
                    b, lambda: self._decode_once(b, rows, row_ids, captured=True))
        return self._sync()

    def _graph_key(self, b: int, row_ids: list[int]):
        """What a captured whole step depends on besides tensor contents, or None when it must run uncaptured
        (no CUDA graphs, or a seeded request: its generator draws outside the graph's RNG)."""
        if not self.engine.use_graphs or any(r in self.sampler.generators for r in row_ids):
            return None
        flags = self.sampler.flags(row_ids)
        kmax = self.sampler.top_k_bound(row_ids) if flags["top_k"] else 0
        return (b, tuple(sorted(flags.items())), kmax, self.sampler.layout, self.state.logp is None)

    # ---------------------------------------------------------------- internals
    def _admit(self) -> None:
        free = [i for i, r in enumerate(self.slot_req) if r is None]
        take = []
        while self.pending and free:
            req = self.pending.popleft()
            if req.aborted:
                self.finished.append(Result(req, [], "abort"))
                continue
            take.append((free.pop(0), req))
        if not take:
            return
        slots = [s for s, _ in take]
        logits = self.engine.prefill(slots, [r.prompt_ids for _, r in take])
        dev = self.engine.device
        for s, r in take:
            self.slot_req[s] = r
            self.delivered[s] = 0
            eos = [] if r.params.ignore_eos else list(r.eos_ids)
            self.sampler.set_slot(s, r.params, eos + list(r.params.stop_token_ids or []), r.prompt_ids)
            room = self.engine.max_len - len(r.prompt_ids)
            self.host_max_new[s] = min(r.params.max_tokens or room, room)
            self.max_new[s] = self.host_max_new[s]
            self.left[s] = max(1, self.host_max_new[s] - 1)
            self.pos[s] = len(r.prompt_ids)
            if r.params.logprobs is not None and self.state.logp is None:
                k = 1 + max(r.params.logprobs, 20)
                self.state.logp = torch.zeros(*self.gen.shape, k, device=dev)
                self.state.logp_ids = torch.zeros(*self.gen.shape, k, dtype=torch.long, device=dev)
        slot_t = torch.as_tensor(slots, device=dev)
        self.n_gen[slot_t] = 0
        self.done[slot_t] = False
        self._take_tokens(logits, slot_t, slots, torch.ones(len(slots), dtype=torch.bool, device=dev))

    def _take_tokens(self, logits, rows, row_ids, active):
        tok, processed = self.sampler.sample(logits, rows, row_ids, self.n_gen[rows])
        tok = torch.where(active, tok, self.cur[rows])
        idx = self.n_gen[rows].clamp(max=self.gen.shape[1] - 1)
        self.gen[rows, idx] = torch.where(active, tok, self.gen[rows, idx])
        if self.state.logp is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            k = self.state.logp.shape[2] - 1
            top = torch.topk(lp, k, dim=-1)
            chosen = lp.gather(1, tok[:, None])
            self.state.logp[rows, idx] = torch.cat([chosen, top.values], 1)
            self.state.logp_ids[rows, idx] = torch.cat([tok[:, None], top.indices], 1)
        self.sampler.observe(rows, tok, active)
        self.n_gen[rows] += active.long()
        self.cur[rows] = tok
        eos = self.sampler.eos[rows]
        hit = ((tok[:, None] == eos) & (eos >= 0)).any(-1)
        self.done[rows] |= active & (hit | (self.n_gen[rows] >= self.max_new[rows]))

    def _decode_once(self, b, rows, row_ids, captured: bool = False):
        if captured:  # inside a capture: the raw step on the persistent inputs, no graph replay of its own
            logits = self.engine.step(self.cur[:b], self.pos[:b])
        else:
            logits = self.engine.decode(self.cur[:b], self.pos[:b])
        active = ~self.done[:b]
        self._take_tokens(logits, rows, row_ids, active)
        self.pos[:b] += active.long()

    def _sync(self) -> list[Result]:
        done = self.done.tolist()
        n_gen = self.n_gen.tolist()
        occupied = [i for i, r in enumerate(self.slot_req) if r is not None]
        need = [i for i in occupied if done[i] or self.slot_req[i].on_tokens or self.slot_req[i].params.stop_strings
                or self.slot_req[i].aborted]
        rows = {}
        if need:
            width = max(n_gen[i] for i in need)
            host = self.gen[need, :max(width, 1)].tolist()
            rows = {i: host[j][:n_gen[i]] for j, i in enumerate(need)}
        out = []
        for i in occupied:
            self.left[i] = max(1, self.host_max_new[i] - n_gen[i]) if not done[i] else 1
        for i in need:
            req, ids = self.slot_req[i], rows[i]
            reason, stop_str = None, None
            if req.aborted:
                reason = "abort"
            elif req.params.stop_strings and self.tokenizer is not None:
                cut, stop_str = _find_stop(self.tokenizer, ids, req.params.stop_strings, req.params)
                if cut is not None:
                    ids, reason = ids[:cut], "stop"
            if reason is None and done[i]:
                reason = "stop" if ids and ids[-1] in self.sampler.eos[i].tolist() else "length"
            if req.on_tokens is not None and len(ids) > self.delivered[i]:
                req.on_tokens(ids[self.delivered[i]:])
                self.delivered[i] = len(ids)
            if reason is None:
                continue
            lps = self._logprobs(i, len(ids), req.params.logprobs) if req.params.logprobs is not None else None
            out.append(Result(req, ids, reason, stop_str, lps))
            self.slot_req[i] = None
            self.sampler.clear_slot(i)
            self.done[i] = True
        self.finished.extend(out)
        return out

    def _logprobs(self, slot, n, k):
        vals = self.state.logp[slot, :n, :1 + k].tolist()
        ids = self.state.logp_ids[slot, :n, :1 + k].tolist()
        return [dict(zip(i, v)) for i, v in zip(ids, vals)]


def _find_stop(tokenizer, ids, stops, params):
    """The shortest prefix of ids whose text contains a stop string: (cut length, the stop) or (None, None)."""
    def text(n):
        return tokenizer.decode(ids[:n], skip_special_tokens=params.skip_special_tokens)

    full = text(len(ids))
    hits = [s for s in stops if s in full]
    if not hits:
        return None, None
    lo, hi = 1, len(ids)
    while lo < hi:  # containment grows with the prefix: binary search the first prefix that holds a stop
        mid = (lo + hi) // 2
        if any(s in text(mid) for s in hits):
            hi = mid
        else:
            lo = mid + 1
    t = text(lo)
    first = min(hits, key=lambda s: t.find(s) if s in t else len(t) + 1)
    return lo, first
