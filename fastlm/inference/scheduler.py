"""Continuous batching over the engine's slots.

Requests wait in a queue; a free slot takes the next one (prefill), all occupied slots decode together in the
smallest power-of-two bucket that covers them, and a finished sequence frees its slot for the next prompt.
Token bookkeeping (output buffer, lengths, EOS and length checks) lives on the device; the host looks only every
`sync_every` steps (every step while someone streams), so the token loop itself makes no host sync. Where the
engine compiles and captures (CUDA), the exact part of a decode step's bookkeeping (argmax, stop checks, the
writes into the device state) is one compiled function (`_commit`), a few fused kernels instead of ~25 small ones;
the floating-point part of sampling (penalties, softmax, the draw) stays eager, so the tokens are bit-identical.

    sched = Scheduler(engine, tokenizer)
    sched.add(Request(prompt_ids=[...], params=SamplingParams(...), eos_ids=[2]))
    results = sched.run_all()          # or: while sched.busy(): sched.step()   (the server's loop)
"""
from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .engine import Engine, first_line, raise_dynamo_limits
from .sampling import Sampler, SamplingParams, choose_tokens, observe_tokens

logger = logging.getLogger(__name__)


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
        # decode steps run `_commit` compiled (fused kernels) where the engine compiles and captures its step
        self.fused_bookkeeping = bool(engine.use_graphs and engine.use_compile)
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
    """look_ahead: while nobody streams or waits for a slot, queue the next `sync_every` steps before reading the
    last ones' stop flags (copied to the host behind an event), so the GPU never idles while the host checks them;
    a sequence that stopped meanwhile costs at most that many masked steps. None = on for CUDA."""

    def __init__(self, engine: Engine, tokenizer=None, sync_every: int = 8, look_ahead: bool | None = None):
        self.engine = engine
        engine.view.refresh_adapters()  # adapters may have been trained since the engine was built
        self.tokenizer = tokenizer
        self.sync_every = max(1, int(sync_every))
        self.look_ahead = engine.device.type == "cuda" if look_ahead is None else bool(look_ahead)
        self.ahead = 0  # decode steps queued past the last sync (look-ahead), not yet seen by the host
        self._host = None  # CUDA: pinned host copies of the stop flags and lengths (`_snapshot`)
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
        if self.ahead:  # queued by the last step's look-ahead: they are this round's steps
            n, self.ahead = self.ahead, 0
        else:
            n = 1 if streaming else min(self.sync_every, max(self.left[i] for i in occupied))
            self._decode_steps(b, n)
        snapshot = self._snapshot()
        if self.look_ahead and not streaming and not self.pending and not any(
                self.slot_req[i].params.stop_strings or self.slot_req[i].aborted for i in occupied):
            more = min(self.sync_every, max(self.left[i] for i in occupied) - n)
            if more > 0:
                self._decode_steps(b, more)
                self.ahead = more
        return self._sync(*snapshot)

    def _decode_steps(self, b: int, n: int) -> None:
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

    def _snapshot(self):
        """(event or None, done, n_gen): the stop flags and lengths as the steps queued so far leave them. On CUDA
        copied into pinned host memory behind an event (the host waits for that event, not for steps queued after
        it); elsewhere copies taken now (the steps run as they are queued)."""
        if self.engine.device.type != "cuda":
            return None, self.done.clone(), self.n_gen.clone()
        if self._host is None:
            self._host = (torch.empty(self.done.shape, dtype=torch.bool, pin_memory=True),
                          torch.empty(self.n_gen.shape, dtype=torch.long, pin_memory=True))
        done, n_gen = self._host
        done.copy_(self.done, non_blocking=True)
        n_gen.copy_(self.n_gen, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event, done, n_gen

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

    def _take_tokens(self, logits, rows, row_ids, active=None, fused: bool = False):
        """Pick the next token of `rows` (slot indices, device; `row_ids` the same on the host) from logits [B, V]
        and record it. active [B] bool: the rows that take a token; None: the decode rows not yet done, whose
        positions then advance too. fused: the exact bookkeeping runs compiled (`_commit_fused`)."""
        flags = self.sampler.flags(row_ids)
        n_gen = self.n_gen[rows] if flags["min_new"] else None
        processed, drawn, temp = self.sampler.prepare(logits, rows, row_ids, n_gen, flags)
        args = (processed, drawn, temp, rows, active, None if active is not None else self.pos, self.cur,
                self.n_gen, self.gen, self.max_new, self.done, self.sampler.eos, self.sampler.seen,
                self.sampler.counts)
        tok, idx = self._commit_fused(args) if fused else _commit(*args)
        if self.state.logp is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            k = self.state.logp.shape[2] - 1
            top = torch.topk(lp, k, dim=-1)
            chosen = lp.gather(1, tok[:, None])
            self.state.logp[rows, idx] = torch.cat([chosen, top.values], 1)
            self.state.logp_ids[rows, idx] = torch.cat([tok[:, None], top.indices], 1)

    def _commit_fused(self, args):
        """`_commit` compiled (inductor fuses its ~25 small launches into a few kernels); a failed compile is
        reported once and the state falls back to the eager `_commit` (inside a graph capture the error goes to
        the capture, which then runs the step uncaptured)."""
        if self.state.fused_bookkeeping:
            try:
                return _compiled_commit()(*args)
            except Exception as exc:  # noqa: BLE001
                if self.engine.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise
                logger.warning("fastlm scheduler: the compiled token bookkeeping failed (%s); running it eagerly",
                               first_line(exc))
                self.state.fused_bookkeeping = False
        return _commit(*args)

    def _decode_once(self, b, rows, row_ids, captured: bool = False):
        if captured:  # inside a capture: the raw step on the persistent inputs, no graph replay of its own
            logits = self.engine.step(self.cur[:b], self.pos[:b])
        else:
            logits = self.engine.decode(self.cur[:b], self.pos[:b])
        self._take_tokens(logits, rows, row_ids, fused=self.state.fused_bookkeeping)

    def _sync(self, event, done, n_gen) -> list[Result]:
        if event is not None:  # wait for the steps up to the snapshot only
            event.synchronize()
        done, n_gen = done.tolist(), n_gen.tolist()
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
        if all(r is None for r in self.slot_req):
            self.ahead = 0  # steps queued for sequences that have all finished: nothing to wait for
        self.finished.extend(out)
        return out

    def _logprobs(self, slot, n, k):
        vals = self.state.logp[slot, :n, :1 + k].tolist()
        ids = self.state.logp_ids[slot, :n, :1 + k].tolist()
        return [dict(zip(i, v)) for i, v in zip(ids, vals)]


def _commit(processed, drawn, temp, rows, active, pos, cur, n_gen, gen, max_new, done, eos, seen, counts):
    """The exact part of taking a token for `rows` [B]: choose it (`choose_tokens`), write it into the output
    buffer gen [slots, cap] at the row's count, record it for the penalties, count it, and mark rows done on an
    EOS / stop id or at max_new. active [B] bool: rows that take a token (None: ~done[rows], and pos[rows] of
    those advances). Inactive rows keep their current token and state. Returns (tokens [B], the gen column [B]).
    Only exact operations: compiled (`_compiled_commit`) it writes bit-identical state."""
    if active is None:
        active = ~done[rows]
    tok = torch.where(active, choose_tokens(processed, drawn, temp), cur[rows])
    count = n_gen[rows]
    idx = count.clamp(max=gen.shape[1] - 1)
    gen[rows, idx] = torch.where(active, tok, gen[rows, idx])
    observe_tokens(seen, counts, rows, tok, active)
    count = count + active.long()
    n_gen[rows] = count
    cur[rows] = tok
    stop_ids = eos[rows]
    hit = ((tok[:, None] == stop_ids) & (stop_ids >= 0)).any(-1)
    done[rows] |= active & (hit | (count >= max_new[rows]))
    if pos is not None:
        pos[rows] += active.long()
    return tok, idx


BOOKKEEPING_BACKEND = "inductor"  # torch.compile backend of `_commit` (tests may count compiles with another)
_COMPILED_COMMIT = {}


def _compiled_commit():
    """`_commit` under torch.compile (one compile per batch bucket and sampling variant, made by the uncaptured
    step that precedes each capture)."""
    fn = _COMPILED_COMMIT.get(BOOKKEEPING_BACKEND)
    if fn is None:
        raise_dynamo_limits()
        fn = _COMPILED_COMMIT[BOOKKEEPING_BACKEND] = torch.compile(_commit, backend=BOOKKEEPING_BACKEND,
                                                                   fullgraph=True, dynamic=False)
    return fn


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
