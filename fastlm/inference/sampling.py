"""Sampling: `SamplingParams` (vLLM's field names) and the on-device sampler of the engine.

Per slot the sampler keeps the request's parameters as device tensors, so one batched call samples rows with
different settings: penalties (repetition over prompt + output as in transformers; presence and frequency over
the output as in vLLM / OpenAI), EOS masking before `min_tokens`, temperature, top-k, top-p, min-p (in
transformers' order), then a draw by the exponential race argmax(p / E), E ~ Exp(1), which equals sampling from
p. Greedy rows (temperature 0) take the argmax. Seeded rows draw their noise from their own generator, so a
seeded request gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..errors import ProblemList


@dataclass
class SamplingParams:
    """vLLM's SamplingParams fields. temperature 0 is greedy; top_k -1 or 0 is off; max_tokens counts new tokens.

    stop: strings that end the output (not included unless include_stop_str_in_output); stop_token_ids: extra
    ids that end it (EOS ids always do unless ignore_eos). logprobs: how many top log-probabilities to return per
    token (the sampled token's is always included). seed: per-request seed (n > 1 uses seed, seed + 1, ...).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        p = ProblemList("SamplingParams")
        if not isinstance(self.n, int) or self.n < 1:
            p.add("n", self.n, "an int >= 1", "ask for at least one output per prompt")
        if not _num(self.temperature) or self.temperature < 0:
            p.add("temperature", self.temperature, "a number >= 0 (0 is greedy)", "use 0 for greedy or e.g. 0.7")
        if not _num(self.top_p) or not 0 < self.top_p <= 1:
            p.add("top_p", self.top_p, "a number in (0, 1]", "use 1.0 to switch top-p off")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            p.add("top_k", self.top_k, "an int >= 1, or -1 / 0 for off", "use -1 to switch top-k off")
        if not _num(self.min_p) or not 0 <= self.min_p <= 1:
            p.add("min_p", self.min_p, "a number in [0, 1]", "use 0 to switch min-p off")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            p.add("max_tokens", self.max_tokens, "an int >= 1 (or None: up to the cache length)",
                  "ask for at least one new token")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            p.add("min_tokens", self.min_tokens, "an int >= 0", "use 0")
        if not _num(self.repetition_penalty) or self.repetition_penalty <= 0:
            p.add("repetition_penalty", self.repetition_penalty, "a number > 0 (1.0 is off)", "use 1.0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _num(v) or not -2 <= v <= 2:
                p.add(name, v, "a number in [-2, 2] (0 is off)", "use 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            p.add("logprobs", self.logprobs, "None or an int >= 0", "use None")
        if self.seed is not None and not isinstance(self.seed, int):
            p.add("seed", self.seed, "None or an int", "pass an integer seed")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            p.add("stop", self.stop, "a non-empty string or a list of them", "drop empty stop strings")
        p.raise_if_any()
        self.stop_strings = stop

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        names = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            p = ProblemList("SamplingParams")
            for k in unknown:
                p.add(k, kwargs[k], f"one of {', '.join(sorted(names))}", "drop or rename it")
            p.raise_if_any()
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Sampler:
    """Device-side sampling state for `slots` rows (see module docstring)."""

    def __init__(self, slots: int, vocab: int, device, max_eos: int = 8):
        self.slots, self.vocab, self.device = slots, vocab, device
        f = dict(device=device, dtype=torch.float32)
        self.temperature = torch.zeros(slots, **f)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, **f)
        self.min_p = torch.zeros(slots, **f)
        self.rep = torch.ones(slots, **f)
        self.presence = torch.zeros(slots, **f)
        self.frequency = torch.zeros(slots, **f)
        self.min_new = torch.zeros(slots, dtype=torch.long, device=device)
        self.eos = torch.full((slots, max_eos), -1, dtype=torch.long, device=device)
        self.seen = None  # [slots, V] bool: prompt + output tokens (repetition penalty)
        self.counts = None  # [slots, V] float: output token counts (presence / frequency)
        self.generators: dict[int, torch.Generator] = {}
        self.params: dict[int, SamplingParams] = {}
        self.layout = 0  # bumped whenever a buffer is (re)allocated: captured graphs hold the old addresses

    # ---------------------------------------------------------------- slot setup
    def set_slot(self, slot: int, params: SamplingParams, eos_ids: list[int], prompt: list[int]) -> None:
        self.params[slot] = params
        self.temperature[slot] = 0.0 if params.greedy else float(params.temperature)
        self.top_k[slot] = params.top_k if params.top_k > 0 else 0
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.rep[slot] = params.repetition_penalty
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        self.min_new[slot] = params.min_tokens
        ids = list(dict.fromkeys(eos_ids))
        if len(ids) > self.eos.shape[1]:
            grown = torch.full((self.slots, len(ids)), -1, dtype=torch.long, device=self.device)
            grown[:, :self.eos.shape[1]] = self.eos
            self.eos = grown
            self.layout += 1
        self.eos[slot] = -1
        if ids:
            self.eos[slot, :len(ids)] = torch.as_tensor(ids, device=self.device)
        if params.seed is not None:
            g = torch.Generator(device=self.device)
            g.manual_seed(params.seed)
            self.generators[slot] = g
        else:
            self.generators.pop(slot, None)
        if params.repetition_penalty != 1.0 or self.seen is not None:
            if self.seen is None:
                self.seen = torch.zeros(self.slots, self.vocab, dtype=torch.bool, device=self.device)
                self.layout += 1
            self.seen[slot] = False
            if prompt:
                self.seen[slot, torch.as_tensor(prompt, device=self.device)] = True
        if params.presence_penalty or params.frequency_penalty or self.counts is not None:
            if self.counts is None:
                self.counts = torch.zeros(self.slots, self.vocab, device=self.device)
                self.layout += 1
            self.counts[slot] = 0

    def clear_slot(self, slot: int) -> None:
        self.params.pop(slot, None)
        self.generators.pop(slot, None)

    # ---------------------------------------------------------------- sampling
    def flags(self, rows: list[int]):
        ps = [self.params[r] for r in rows if r in self.params]
        return dict(sample=any(not p.greedy for p in ps), top_k=any(p.top_k > 1 for p in ps if not p.greedy),
                    top_p=any(p.top_p < 1 for p in ps if not p.greedy),
                    min_p=any(p.min_p > 0 for p in ps if not p.greedy),
                    rep=any(p.repetition_penalty != 1.0 for p in ps),
                    pf=any(p.presence_penalty or p.frequency_penalty for p in ps),
                    min_new=any(p.min_tokens > 0 for p in ps))

    def top_k_bound(self, rows: list[int]) -> int:
        return max([self.params[r].top_k for r in rows if r in self.params] or [0])

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, row_ids: list[int], n_gen: torch.Tensor):
        """logits [B, V] float32 for slot indices `rows` (device) / `row_ids` (host); n_gen [B] tokens generated
        so far. Returns (tokens [B], processed logits [B, V] used for the draw)."""
        processed, drawn, temp = self.prepare(logits, rows, row_ids, n_gen)
        return choose_tokens(processed, drawn, temp), processed

    def prepare(self, logits: torch.Tensor, rows: torch.Tensor, row_ids: list[int], n_gen: torch.Tensor | None,
                flags: dict | None = None):
        """The floating-point part of `sample` (penalties, EOS masking, temperature, top-k/p, min-p, the draw),
        always eager: (processed logits [B, V], drawn [B] or None when no row samples, temperature [B] or None).
        `choose_tokens` makes the tokens of them. n_gen [B] is read only for min_tokens (None otherwise)."""
        flags = self.flags(row_ids) if flags is None else flags
        logits = logits[:, :self.vocab] if logits.shape[1] > self.vocab else logits
        if flags["rep"]:
            rep = self.rep[rows][:, None]
            seen = self.seen[rows]
            penalized = torch.where(logits < 0, logits * rep, logits / rep)
            logits = torch.where(seen, penalized, logits)
        if flags["pf"]:
            counts = self.counts[rows]
            logits = logits - self.frequency[rows][:, None] * counts - self.presence[rows][:, None] * (counts > 0)
        if flags["min_new"]:
            eos = self.eos[rows]
            block = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
            block.scatter_(1, torch.where(eos < 0, logits.shape[1], eos), True)
            block = block[:, :-1] & (n_gen < self.min_new[rows])[:, None]
            logits = logits.masked_fill(block, float("-inf"))
        if not flags["sample"]:
            return logits, None, None
        temp = self.temperature[rows]
        scores = logits / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
        if flags["top_k"]:
            k = self.top_k[rows]
            kmax = int(min(self.top_k_bound(row_ids), scores.shape[1]))
            top = torch.topk(scores, kmax, dim=-1).values
            kth = top.gather(1, (k.clamp(min=1, max=kmax) - 1)[:, None])
            scores = torch.where((k[:, None] > 0) & (scores < kth), float("-inf"), scores)
        if flags["top_p"]:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
            drop_sorted = before > self.top_p[rows][:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        if flags["min_p"]:
            probs = torch.softmax(scores, dim=-1)
            thr = self.min_p[rows][:, None] * probs.max(dim=-1, keepdim=True).values
            scores = scores.masked_fill(probs < thr, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        noise = torch.empty_like(probs).exponential_(1.0)
        for i, r in enumerate(row_ids):
            g = self.generators.get(r)
            if g is not None:
                noise[i] = torch.empty(probs.shape[1], device=probs.device).exponential_(1.0, generator=g)
        return logits, (probs / noise).argmax(-1), temp


def choose_tokens(processed: torch.Tensor, drawn: torch.Tensor | None, temp: torch.Tensor | None) -> torch.Tensor:
    """The tokens of `Sampler.prepare`'s result: the drawn one where the temperature is above 0, else the argmax
    of the processed logits. Exact operations only (argmax, compare, select), so a compiled copy of it (the
    scheduler's fused bookkeeping) picks bit-identical tokens."""
    greedy = processed.argmax(-1)
    return greedy if drawn is None else torch.where(temp > 0, drawn, greedy)


def observe_tokens(seen: torch.Tensor | None, counts: torch.Tensor | None, rows: torch.Tensor, tokens: torch.Tensor,
                   active: torch.Tensor) -> None:
    """Record the tokens of active rows for the penalties: `Sampler.seen` [slots, V] (repetition) and
    `Sampler.counts` [slots, V] (presence / frequency), when allocated. Exact operations, as in choose_tokens."""
    if seen is not None:
        seen[rows, tokens] |= active
    if counts is not None:
        counts[rows, tokens] += active.float()
