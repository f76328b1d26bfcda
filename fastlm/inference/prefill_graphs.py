"""Captured prefills: a short prompt replays a CUDA graph instead of dispatching the layers' launches one by one.

The eager prefill of a 128-token prompt on Llama-3.2-1B launches about 1,200 kernels: 30 ms of time to first token
on an H100 for 4.4 ms of GPU work (scripts/gpu_step_overhead.py). Prompts of up to `WIDTHS[-1]` tokens, in
admissions of up to `MAX_ROWS` prompts and `MAX_TOKENS` padded tokens, are right-padded to the next width of
`WIDTHS` (the padding the engine's prefill already allows: a pad position of a slot is written but never attended
later) and run as one replay of a graph captured for (prompts, width). The first prompt of a new (prompts, width)
runs eagerly and the graph is captured after it, so no prompt waits for a capture it does not use. The graphs share
one memory pool (they run one at a time on the engine's stream); each keeps its logits buffer, which the caller
reads before the next prefill.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import first_line

logger = logging.getLogger(__name__)

# padded widths: powers of two and the 1.5x steps between them, so a prompt does at most 1.5x its own work
WIDTHS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024)
MAX_ROWS = 4  # prompts admitted together; larger admissions are long enough to keep the GPU busy eagerly
# padded tokens of one captured prefill at most: the graphs' pool keeps the largest one's activations for the
# engine's life (the attention scores of 1,024 tokens are 4 MB per head in fp32)
MAX_TOKENS = 1024


def graph_width(n_prompts: int, longest: int, max_len: int) -> int | None:
    """The padded width a prefill of n_prompts prompts (the longest `longest` tokens) replays at, or None (eager)."""
    if n_prompts > MAX_ROWS or longest > WIDTHS[-1]:
        return None
    width = min(next(w for w in WIDTHS if w >= longest), max_len)
    return width if n_prompts * width <= MAX_TOKENS else None


def cuda_capture(fn: Callable[..., torch.Tensor], inputs: tuple, pool) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture fn(*inputs) in a CUDA graph using `pool`: (replay, the graph's output tensor). The graph reads the
    inputs' memory at each replay: the caller keeps them alive as long as it replays."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), torch.no_grad():
        out = fn(*inputs)
    return graph.replay, out


class PrefillGraphs:
    """The captured prefills of one engine, keyed by (prompts, width).

    `forward(tokens, positions, slots, last)` is the prefill itself (the engine's view over its cache, attending
    to `width` positions). `capture(fn, inputs, pool)` defaults to `cuda_capture`; the tests pass one that runs
    fn eagerly at each replay, to check the static inputs without a GPU."""

    def __init__(self, device: torch.device, forward, capture=None, enabled: bool = True):
        self.device = device
        self.forward = forward
        self.capture = capture or cuda_capture
        self.enabled = enabled  # False: the engine prefills eagerly (no CUDA graphs, or a capture failed)
        self.entries: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """tokens [n, width] (right-padded, on the device), slots [n], last [n]: the logits [n, V] of each row's
        position `last`. Replays the (n, width) graph, or runs eagerly and captures it for the next time."""
        key = tuple(tokens.shape)
        entry = self.entries.get(key)
        if entry is not None:
            replay, (static_tok, _, static_slots, static_last), out = entry
            static_tok.copy_(tokens)
            static_slots.copy_(slots)
            static_last.copy_(last)
            replay()
            return out
        positions = torch.arange(key[1], device=self.device)[None].expand(key).contiguous()
        logits = self.forward(tokens, positions, slots, last)  # this prompt's answer; also warms every kernel
        if self.enabled:
            self._capture(key, (tokens.clone(), positions, slots.clone(), last.clone()))
        return logits

    def _capture(self, key, inputs) -> None:
        try:
            if self.pool is None and self.device.type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            replay, out = self.capture(self.forward, inputs, self.pool)
        except Exception as exc:  # noqa: BLE001 - prefill eagerly from now on, reported once
            logger.warning("fastlm engine: the prefill could not be captured in a CUDA graph (%s); prefilling "
                           "eagerly", first_line(exc))
            self.enabled = False
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return
        self.entries[key] = (replay, inputs, out)  # the inputs too: the graph reads their memory at every replay
