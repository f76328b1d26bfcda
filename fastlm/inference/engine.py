"""The decode engine: a model's own weights over a static KV cache, prefill and decode as separate steps.

    engine = Engine(model, max_slots=8, max_len=1024)
    logits = engine.prefill(slots=[0, 1], prompts=[[1, 2, 3], [4, 5]])    # [2, V], resets those slots
    logits = engine.decode(tokens, positions)                           # tokens/positions [B] on device -> [B, V]

`decode` runs slots 0..B-1 where B is a power-of-two bucket (the scheduler packs active sequences into the low
slots). On CUDA each bucket's decode step is compiled by inductor (fusing norms, RoPE, activation) and captured
once in a CUDA graph; replay copies the inputs into the graph's static buffers, so the token loop makes no host
sync. On CPU the step runs eagerly. With graphs, a short prompt prefills by replaying a graph captured per
(prompts, padded width) (prefill_graphs.py): the eager prefill is launch-bound. The prefill can be compiled instead
(`compile_prefill=True`): one regional compile of the layer with the token dimension dynamic serves every prompt
length (short prompts padded to `PREFILL_MIN_TOKENS` positions), one more every batch of several prompts. It is off
by default: on the H100 it added about 20 s of warm-up per compile for a time to first token of 21.4 ms against 22.6
eager (1B, prompt 128).
Families without an ArchSpec are refused (`UnsupportedModelError`); callers fall back to transformers' generate.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from ..arch import lookup
from ..errors import UnsupportedFeatureError, first_line
from ..kernels._triton import graph_replay_ms
from ..state import base_model_of
from .decoder import DecoderView
from .kv_cache import StaticKVCache
from .prefill_graphs import PrefillGraphs, graph_width

logger = logging.getLogger(__name__)

# the compiled prefill pads prompts shorter than this (never past the cache): every prompt length then runs the
# same compiled graph (the LoRA up-projection writes 8 rows or fewer differently when compiled, see
# projection._lora_up, which would be a second compile for prompts of up to 8 tokens)
PREFILL_MIN_TOKENS = 16
PREFILL_BACKEND = "inductor"  # torch.compile backend of the prefill (tests count compiles with another one)


class UnsupportedModelError(UnsupportedFeatureError):
    """The engine cannot serve this model (no ArchSpec, or a layout it does not read)."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def adapter_state_key(model) -> tuple:
    """What the fused weights depend on besides the tensors themselves: active adapters and whether disabled."""
    for module in base_model_of(model).modules():
        if hasattr(module, "lora_A") and hasattr(module, "active_adapters"):
            return (tuple(module.active_adapters), bool(getattr(module, "disable_adapters", False)),
                    bool(getattr(module, "merged", False)))
    return ()


class Engine:
    """Static-cache prefill/decode over `model` (a transformers causal LM or a PEFT wrapper of one).

    max_slots: sequences decoded together (the batch buckets are powers of two up to it).
    max_len: cache length per slot (prompt + generated tokens); defaults to the model's max_seq_length.
    cuda_graphs / compile: None = on for CUDA, off for CPU. fuse: concatenate q/k/v and gate/up weights once
    (None = on for CUDA); adapters stay unmerged and exact either way. compile_prefill: run the prefill through
    torch.compile as well (None = off, see above; True: compiled lazily at the first prefill or in `warmup`, where
    a failed compile is reported once and the prefill runs eagerly from then on).
    """

    def __init__(self, model, max_slots: int = 1, max_len: int | None = None, cuda_graphs: bool | None = None,
                 compile: bool | None = None, fuse: bool | None = None, compile_prefill: bool | None = None):
        base = base_model_of(model)
        spec = lookup(getattr(base.config, "model_type", None))
        if spec is None or not hasattr(getattr(base, "model", None), "layers"):
            raise UnsupportedModelError(
                f"the fastlm engine has no spec for model_type={getattr(base.config, 'model_type', None)!r}; "
                "generation goes through transformers' generate")
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots}: must be >= 1")
        if max_len is None:
            max_len = int(getattr(base, "max_seq_length", None) or getattr(base.config, "max_position_embeddings",
                                                                         2048))
        self.model = model
        self.base = base
        device = next(base.parameters()).device
        on_cuda = device.type == "cuda"
        self.device = device
        self.max_slots = max_slots
        self.max_len = int(max_len)
        self.use_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.use_compile = on_cuda if compile is None else compile
        if compile_prefill not in (None, True, False):
            raise ValueError(f"compile_prefill={compile_prefill!r}: must be None (off), True or False")
        self.use_prefill_compile = bool(compile_prefill)
        self._prefill_fns = None  # (layer, head) compiled for the prefill, built at the first compiled prefill
        self.view = DecoderView(base, spec, self.max_len, fuse=on_cuda if fuse is None else fuse)
        self.cache = StaticKVCache(len(self.view.layers), max_slots, self.view.n_kv, self.max_len,
                                   self.view.head_dim, self.view.dtype, device)
        self.adapter_key = adapter_state_key(model)
        self.vocab_size = base.config.vocab_size
        self._graphs: dict[int, tuple] = {}
        self._prefill_graphs = PrefillGraphs(device, self._prefill_forward, enabled=self.use_graphs)
        self._attention_picked = False  # "auto": the first captured bucket chose view.compiled_attention for all
        self._compiled = None
        self.warmup_seconds = 0.0

    def __deepcopy__(self, memo):
        """A deep copy of the model gets no engine (its fused copies, cache and CUDA graphs belong to the original);
        `get_engine` builds one for the copy when it first generates."""
        return None

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write each prompt into its slot from position 0 and return the last token's logits [n, V] (float32).
        Rows are right-padded to the longest prompt (the compiled prefill pads to at least PREFILL_MIN_TOKENS
        positions, the captured one to a width of prefill_graphs.WIDTHS); with CUDA graphs the returned tensor may
        be a graph's output buffer: use it before the next call. A pad position of a slot is written here but never
        attended later: a decode step writes its own key and value at its position before attending to positions
        up to it."""
        if len(slots) != len(prompts) or not prompts:
            raise ValueError("prefill needs one slot per prompt")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("prefill got an empty prompt")
        t = max(lengths)
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the engine's cache of {self.max_len}")
        # compiled: 2 <= width < max_len, one graph for all (a token dimension of 1 is the decode step's shape, and
        # one of the whole cache's length would be specialised); the rare prompt that fills the cache runs eagerly
        compiled = self.use_prefill_compile and t < self.max_len and self.max_len > 2
        graphs = self._prefill_graphs.enabled and not compiled
        graph_w = graph_width(len(prompts), t, self.max_len) if graphs else None
        captured = graph_w is not None
        width = graph_w if captured else min(max(t, 2, PREFILL_MIN_TOKENS), self.max_len - 1) if compiled else t
        tokens = _padded(prompts, width).to(self.device, non_blocking=True)
        last = torch.as_tensor([n - 1 for n in lengths], device=self.device)
        slot_t = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        if captured:  # short prompts on CUDA: a captured graph per (prompts, padded width), see prefill_graphs
            return self._prefill_graphs(tokens, slot_t, last)
        positions = torch.arange(width, device=self.device)[None].expand(len(prompts), width).contiguous()
        if compiled:
            try:
                layer, head = self._prefill_compiled()
                return self.view.forward(tokens, positions, slot_t, self.cache.k, self.cache.v, last=last,
                                         layer=layer, head=head)
            except Exception as exc:  # noqa: BLE001 - eager from now on, reported once
                logger.warning("fastlm engine: the compiled prefill failed (%s); prefilling eagerly",
                               first_line(exc))
                self.use_prefill_compile = False
                self._prefill_fns = None
        return self.view.forward(tokens, positions, slot_t, self.cache.k, self.cache.v, last=last, kv_len=width)

    def _prefill_forward(self, tokens, positions, slots, last):
        """The eager prefill over the padded width (what `PrefillGraphs` runs and captures)."""
        return self.view.forward(tokens, positions, slots, self.cache.k, self.cache.v, last=last,
                                 kv_len=tokens.shape[1])

    def _prefill_compiled(self):
        """(layer, head) for `DecoderView.forward` over a prompt: the view's own layer and head compiled once with
        the token dimension dynamic (each layer attends to the cache positions 0..T-1 it has just written)."""
        if self._prefill_fns is None:
            raise_dynamo_limits()
            view = self.view

            def prefill_layer(lv, x, positions, pos_c, slots, kc, vc):
                return view.layer(lv, x, positions, pos_c, slots, kc, vc, x.shape[1])

            def prefill_head(x, last):
                return view.head(x, last)

            layer_c = torch.compile(prefill_layer, backend=PREFILL_BACKEND, fullgraph=False)
            head_c = torch.compile(prefill_head, backend=PREFILL_BACKEND, fullgraph=False)

            def layer(lv, x, positions, pos_c, slots, kc, vc, kv_len=None):
                _mark_dynamic((x, positions, pos_c), (slots,))
                return layer_c(lv, x, positions, pos_c, slots, kc, vc)

            def head(x, last):
                _mark_dynamic((x,), (last,))
                return head_c(x, last)

            self._prefill_fns = (layer, head)
        return self._prefill_fns

    def _warm_prefill(self, batch_sizes: list[int]) -> None:
        """Compile the prefill now for these batch sizes (1, and 2 for any larger: one compile serves every batch
        of two or more) over a prompt of up to 128 tokens, keeping what the slots' cache held."""
        width = min(self.max_len - 1, 128)
        if not self.use_prefill_compile or width < 2:
            return
        sizes = sorted({min(n, 2) for n in batch_sizes if n <= self.max_slots} or {1})
        for n in sizes:
            saved = [c[:n, :, :width].clone() for c in self.cache.k + self.cache.v]
            try:
                self.prefill(list(range(n)), [[1] * width] * n)
            finally:
                for c, kept in zip(self.cache.k + self.cache.v, saved):
                    c[:n, :, :width] = kept

    def bucket(self, n: int) -> int:
        return min(_next_pow2(n), self.max_slots) if n <= self.max_slots else self._too_many(n)

    def _too_many(self, n):
        raise ValueError(f"{n} sequences do not fit the engine's {self.max_slots} slots")

    def _decode_eager(self, tokens, positions):
        return self.view.forward(tokens[:, None], positions[:, None], None, self.cache.k, self.cache.v)

    def _decode_compiled(self, tokens, positions):
        layer, head = self._compiled
        return self.view.forward(tokens[:, None], positions[:, None], None, self.cache.k, self.cache.v,
                                 layer=layer, head=head)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for slots 0..B-1: tokens/positions [B] long on the engine's device -> logits [B, V] float32.
        B must be a bucket size (see `bucket`). With CUDA graphs the returned tensor is the graph's output
        buffer: use it before the next call."""
        b = tokens.shape[0]
        if not self.use_graphs:
            fn = self._step_fn()
            return fn(tokens, positions)
        graph = self._graphs.get(b) or self._capture(b)
        if graph is None:  # capture failed: this engine decodes without graphs from now on
            return self._step_fn()(tokens, positions)
        g, static_tok, static_pos, static_out = graph
        static_tok.copy_(tokens)
        static_pos.copy_(positions)
        g.replay()
        return static_out

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode step itself (compiled where the engine compiles), without a graph replay: for callers
        that capture it together with their own device work (`capture_with`)."""
        return self._step_fn()(tokens, positions)

    def capture_with(self, b: int, body):
        """Capture `body()` in a CUDA graph: a decode step through `step` on persistent input tensors plus the
        caller's device-only bookkeeping (sampling, stop checks), so a whole token costs one replay. The step is
        compiled and warmed by the bucket's own capture first. Returns the graph, or None (no graphs here, or the
        capture failed: the caller keeps decoding uncaptured; reported once)."""
        if not self.use_graphs or (b not in self._graphs and self._capture(b) is None):
            return None
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                body()
            return graph
        except Exception as exc:  # noqa: BLE001 - the caller falls back to uncaptured steps
            if not getattr(self, "_capture_with_failed", False):
                logger.warning("fastlm engine: sampling could not be captured with the decode step (%s); "
                               "sampling runs outside the graph", first_line(exc))
                self._capture_with_failed = True
            return None

    def _step_fn(self):
        if not self.use_compile:
            return self._decode_eager
        if self._compiled is None:
            raise_dynamo_limits()
            # regional compilation: one layer's code is compiled once and serves every layer (the layers differ
            # only in their tensors, and sliding/global attention at most), which keeps the warm-up short; the
            # batch buckets differ only in the batch size (automatic dynamic shapes: one more compile at most)
            self._compiled = (torch.compile(self.view.layer, fullgraph=False),
                              torch.compile(self.view.head, fullgraph=False))
        return self._decode_compiled

    def _capture(self, b: int):
        """Compile (first use) and capture the decode step of bucket b in a CUDA graph. Falls back to eager
        capture if compilation fails, and to no graph at all if capture fails (each with one notice)."""
        from . import decoder

        start = time.perf_counter()
        tok = torch.zeros(b, dtype=torch.long, device=self.device)
        pos = torch.zeros(b, dtype=torch.long, device=self.device)
        if decoder.COMPILED_DECODE_ATTENTION == "auto" and not self._attention_picked:
            self.view.compiled_attention = "sum"  # the first bucket starts from products and sums (_pick_attention)
        fn = self._step_fn()
        try:
            out = self._graph_capture(fn, tok, pos)
        except Exception as exc:  # noqa: BLE001 - fall back, reported once
            out = None
            if self.use_compile:
                logger.warning("fastlm engine: compiled decode step could not be captured (%s); capturing "
                               "the eager step instead", first_line(exc))
                self.use_compile = False
                self._compiled = None
                try:
                    out = self._graph_capture(self._decode_eager, tok, pos)
                except Exception as exc2:  # noqa: BLE001
                    exc = exc2
            if out is None:
                logger.warning("fastlm engine: the decode step could not be captured in a CUDA graph (%s); "
                               "decoding without graphs", first_line(exc))
                self.use_graphs = False
                torch.cuda.synchronize()
                return None
        if self.use_compile:
            out = self._pick_attention(b, tok, pos, out)
        self._graphs[b] = out
        self.warmup_seconds += time.perf_counter() - start
        return out

    def _pick_attention(self, b: int, tok, pos, first):
        """With COMPILED_DECODE_ATTENTION = "auto", at the first captured bucket: capture the step again with the
        Triton decode-attention op, time both graphs with the query at the middle of the cache (products and sums
        read the whole cache at every position, the op only the keys up to the query) and keep the faster form for
        this bucket and every later one, so all batch sizes decode with the same numerics. Any failure keeps the
        first capture."""
        from . import decoder

        view = self.view
        if decoder.COMPILED_DECODE_ATTENTION != "auto" or self._attention_picked or view.compiled_attention != "sum":
            return first
        self._attention_picked = True
        try:
            t_sum = self._replay_ms(first, b)
            view.compiled_attention = "kernel"
            other = self._graph_capture(self._step_fn(), tok.clone(), pos.clone())
            t_kernel = self._replay_ms(other, b)
        except Exception as exc:  # noqa: BLE001 - the measured form stays
            logger.debug("fastlm engine: decode-attention kernel not captured (%s)", first_line(exc))
            view.compiled_attention = "sum"
            return first
        choice = "kernel" if t_kernel < t_sum else "sum"
        logger.debug("fastlm engine: decode attention %s (%.3f ms vs %.3f ms at position %d)", choice,
                     min(t_kernel, t_sum), max(t_kernel, t_sum), self.max_len // 2)
        view.compiled_attention = choice
        return other if choice == "kernel" else first

    def _replay_ms(self, captured, b: int, reps: int = 10) -> float:
        """Quick mean timing of a captured step (graph, tok, pos, out) of bucket b, its query at mid-cache."""
        graph, _, pos, _ = captured
        mid = self.max_len // 2
        with self._keeping_position(b, mid):
            pos.fill_(mid)
            try:
                return graph_replay_ms(graph, reps)
            finally:
                pos.zero_()

    @contextlib.contextmanager
    def _keeping_position(self, b: int, p: int = 0):
        """Warm-up runs, captures and timing replays write position p of slots 0..b-1, which may hold a live
        sequence: put it back afterwards."""
        saved = [t[:b, :, p].clone() for t in self.cache.k + self.cache.v]
        try:
            yield
        finally:
            for t, kept in zip(self.cache.k + self.cache.v, saved):
                t[:b, :, p] = kept

    def _graph_capture(self, fn, tok, pos):
        with self._keeping_position(tok.shape[0]):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):
                    fn(tok, pos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                out = fn(tok, pos)
            torch.cuda.synchronize()
        return graph, tok, pos, out

    def warmup(self, buckets: list[int] | None = None) -> float:
        """Compile the prefill and compile and capture the decode step for these batch sizes now; returns the
        seconds spent (also added to `warmup_seconds`)."""
        start = time.perf_counter()
        self._warm_prefill(buckets or [1])
        self.warmup_seconds += time.perf_counter() - start
        for b in buckets or [1]:
            bb = self.bucket(b)
            if bb not in self._graphs and self.use_graphs:
                self._capture(bb)
        return time.perf_counter() - start


def _mark_dynamic(batch_by_tokens, batch) -> None:
    """Mark the token dimension of [B, T, ...] tensors dynamic, and the batch dimension of them and of the [B]
    tensors where B >= 2 (a batch of one is its own compile: dynamo specialises sizes 0 and 1)."""
    for tensor in batch_by_tokens:
        torch._dynamo.mark_dynamic(tensor, 1)
    if batch_by_tokens[0].shape[0] >= 2:
        for tensor in batch_by_tokens + batch:
            torch._dynamo.mark_dynamic(tensor, 0)


def _padded(prompts: list[list[int]], width: int) -> torch.Tensor:
    """The prompts as a [n, width] long tensor, right-padded with token 0."""
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    return tokens


def raise_dynamo_limits() -> None:
    """Every engine (and batch-size bucket) is a fresh compile of the same code: keep dynamo from falling back to
    eager after its default limit of 8."""
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    if hasattr(dynamo.config, "accumulated_cache_size_limit"):
        dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 512)


def get_engine(model, slots: int, max_len: int) -> Engine:
    """The engine cached on the model, rebuilt when it is too small or the adapter state changed."""
    base = base_model_of(model)
    engine = getattr(base, "_fastlm_engine", None)
    if engine is not None and (engine.max_slots < slots or engine.max_len < max_len
                               or engine.adapter_key != adapter_state_key(model)):
        engine = None
    if engine is None:
        old = getattr(base, "_fastlm_engine", None)
        limit = int(getattr(base.config, "max_position_embeddings", 0) or 0) or None
        want_len = max(max_len, getattr(old, "max_len", 0) if old is not None else 0)
        want_len = -(-want_len // 256) * 256
        if limit:
            want_len = max(min(want_len, limit), max_len)
        want_slots = max(_next_pow2(slots), getattr(old, "max_slots", 0) if old is not None else 0)
        base.__dict__.pop("_fastlm_engine", None)
        del old
        engine = Engine(model, max_slots=want_slots, max_len=want_len)
        base.__dict__["_fastlm_engine"] = engine
    return engine


def drop_engine(model) -> None:
    """Forget the cached engine (its fused weight copies and cache), e.g. when training changes the weights."""
    base_model_of(model).__dict__.pop("_fastlm_engine", None)
