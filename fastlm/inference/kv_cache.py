"""The engine's preallocated static KV cache: keys and values [layers, slots, kv_heads, max_len, head_dim].

A slot holds one sequence; position p of a slot is written once by prefill or decode and read by later queries.
Entries past a slot's current length are never attended (the causal mask hides them), so a slot is reused by
the next sequence without clearing it.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
