"""The engine's preallocated static KV cache: per layer, keys and values [slots, kv_heads, max_len, head_dim].

One tensor per layer (not views of one big tensor), so a compiled decode step writes each cache in place as a
graph input instead of through a view of a shared base.

A slot holds one sequence; position p of a slot is written once by prefill or decode and read by later queries.
Entries past a slot's current length are never attended (the causal mask hides them), so a slot is reused by
the next sequence without clearing it.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
