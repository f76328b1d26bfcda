"""One-query attention over a static KV cache, for the engine's decode step ("flash-decoding": split-K).

    decode_attention(q [B, H, 1, D], k_cache [S, KV, L, D], v_cache, positions [B], scaling, softcap, window)
        -> [B, 1, H * D]

Row b reads cache slot b. Key j is seen by the query at position p when j <= p (and j > p - window on sliding
layers); scores are scaled, then soft-capped (`cap * tanh(s / cap)`, Gemma 2) before the softmax. The matmul
version a prefill uses (`decode_attention_reference`) is the reference.

Two launches. The split kernel runs one program per (row, kv head, split): split s takes the keys
[lo + s * CHUNK, lo + (s + 1) * CHUNK) of the row's allowed range [lo, hi) (hi = p + 1, lo = p - window + 1 or 0),
for all G query heads of the kv head at once (GQA), and walks them in BLOCK_L steps with an online softmax in fp32.
It writes a partial per query head: running max m, sum l and the unnormalised output acc [D] (fp32 scratch). A
split that starts at or past hi writes the empty partial (m = -inf, l = 0, no acc). The combine kernel, one
program per (row, query head), rescales the live partials (m > -inf) by exp(m_s - max m) and writes
sum(acc) / sum(l) in q's dtype, the heads side by side, ready for the o projection.

The split kernel has two forms: with TENSOR_CORES (the default where bf16 tensor cores exist) tl.dot with the G
heads padded to 16 rows (q.k in the cache dtype with fp32 sums, p.v in tf32; ieee fp32 for fp32 caches), else
products and sums in fp32 on CUDA cores. scripts/gpu_attention_check.py times both.

The positions are read on the device only: CHUNK and the number of splits depend on the cache length and the
window (host constants), so one launch can be captured in a CUDA graph and replayed at any position.

On Hopper both kernels are launched with programmatic dependent launch (kernels/_triton.py `pdl_mode`): each may
be scheduled while the kernel before it finishes, and waits for it before its first load (everything they read is
written by earlier kernels of the step), so what overlaps is the launch and the scheduling of the programs.
"""
from __future__ import annotations

import sys

import torch

from ._triton import jit, next_pow2, pdl_launch, pdl_mode, pdl_wait, register_opaque_op, tl, use_triton

# Split plan (see `split_plan`): chunks of 32 keys while the span a query can see is at most SMALL_SPAN keys, else
# 64, and at most MAX_SPLITS splits (longer spans get longer chunks, walked in BLOCK_L steps).
SMALL_SPAN = 1024
MAX_SPLITS = 128
# a split program holds a [BLOCK_G, BLOCK_L, BLOCK_D] fp32 product: at most this many elements (registers)
PRODUCT_ELEMENTS = 8192
# scores and weighted values by tl.dot (tensor cores, heads padded to 16 rows) instead of products and sums: faster
# on the H100 in all 16 cases of scripts/gpu_attention_check.py (Llama-3.2-1B and Gemma-2-2B shapes, L 385/4096,
# batch 1/64; median time 0.65x), within the same error against fp32
TENSOR_CORES = True


def decode_attention_reference(q, k_cache, v_cache, positions, scaling: float, softcap: float | None = None,
                               window: int | None = None) -> torch.Tensor:
    b, h, _, d = q.shape
    kv = k_cache.shape[1]
    g = h // kv
    k, v = k_cache[:b].float(), v_cache[:b].float()
    qg = q.float().reshape(b, kv, g, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scaling  # [B, kv, g, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(k.shape[2], device=q.device)
    allowed = key_pos[None, :] <= positions[:, None]
    if window is not None:
        allowed = allowed & (key_pos[None, :] > positions[:, None] - window)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, kv, g, D]
    return out.reshape(b, 1, h * d).to(q.dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(length: int, window: int | None, block_l: int, chunk: int | None = None) -> tuple[int, int, int]:
    """(CHUNK, SPLITS, BLOCK_L) for a cache of `length` keys: enough splits of CHUNK keys to cover the longest
    allowed range, min(length, window) keys. Short spans use chunks of 32 keys (a decode at batch 1 has few programs
    otherwise: Llama-3.2-1B at position 128 runs 8 kv heads x 5 live splits of 32 keys, 3 of 64), longer ones 64
    (fewer partials to write and combine); past MAX_SPLITS splits the chunk grows instead, rounded up to whole
    steps of BLOCK_L keys (`block_l`, lowered to the chunk when it is longer). Examples at BLOCK_L 32: L 385 ->
    13 x 32; L 4096 -> 64 x 64; L 32768 -> 128 x 256; L 32768 with a 4096 window -> 64 x 64. The positions play
    no part: the plan holds for every step a CUDA graph replays. A given `chunk` is taken as it is (tests, and
    the GPU script's sweep)."""
    span = max(1, min(length, window or length))
    if chunk is not None:
        return chunk, _cdiv(span, chunk), min(block_l, chunk)
    chunk = 32 if span <= SMALL_SPAN else 64
    block_l = min(block_l, chunk)
    if _cdiv(span, chunk) > MAX_SPLITS:
        chunk = _cdiv(_cdiv(span, MAX_SPLITS), block_l) * block_l
    return chunk, _cdiv(span, chunk), block_l


@jit
def _decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, stride_pos, stride_qb,
                                   stride_qh, stride_kb, stride_kh, stride_kl, L, CHUNK, SPLITS, scaling, softcap,
                                   window,
                                   G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                                   BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                                   HAS_WINDOW: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                   USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)  # q, the cache and the positions are written by earlier kernels: nothing is read before
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr + b * stride_pos).to(tl.int32)
    gi = tl.arange(0, BLOCK_G)
    di = tl.arange(0, BLOCK_D)
    g_ok = gi < G
    d_ok = di < D
    heads = kvh * G + gi
    hi = tl.minimum(pos + 1, L)
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
    else:
        lo = pos * 0
    start = lo + split * CHUNK
    end = tl.minimum(start + CHUNK, hi)  # start >= hi: no keys, the loop below is empty
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + di[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if USE_DOT:  # tensor cores: q in the cache's dtype, its rows padded to 16 (zeros past G)
        q = q.to(k_ptr.dtype.element_ty)
    else:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    base = b.to(tl.int64) * stride_kb + kvh * stride_kh
    for block in range(start, end, BLOCK_L):
        li = block + tl.arange(0, BLOCK_L)
        l_ok = li < end
        offs = base + li[:, None].to(tl.int64) * stride_kl + di[None, :]
        kmask = l_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kmask, other=0.0)
        v = tl.load(v_ptr + offs, mask=kmask, other=0.0).to(tl.float32)  # issued with k: one memory wait, not two
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scaling  # [BLOCK_G, BLOCK_L]
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scaling
        if HAS_SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(l_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:  # fp32 weights: tf32 keeps 10 mantissa bits of p, and a 16-bit v exactly
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    part = (b * (G * tl.num_programs(1)) + heads).to(tl.int64) * SPLITS + split  # [BLOCK_G]
    tl.store(m_ptr + part, m_i, mask=g_ok)
    tl.store(l_ptr + part, l_i, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * D + di[None, :], acc,
             mask=(g_ok & (start + gi * 0 < hi))[:, None] & d_ok[None, :])  # an empty split's acc is never read


@jit
def _decode_attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                     BLOCK_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)  # the partials are the split kernel's
    # the live splits are those with m > -inf (an empty one wrote -inf and no acc): no position to read first, and
    # acc is loaded along with m (an empty split's stale acc is dropped by the where, NaN included)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * tl.num_programs(1) + h).to(tl.int64) * SPLITS
    si = tl.arange(0, BLOCK_SPLITS)
    m = tl.load(m_ptr + row + si, mask=si < SPLITS, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    weights = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    denom = tl.sum(weights * tl.load(l_ptr + row + si, mask=si < SPLITS, other=0.0), axis=0)
    di = tl.arange(0, BLOCK_D)
    d_ok = di < D
    total = tl.zeros([BLOCK_D], tl.float32)
    for first in range(0, SPLITS, BLOCK_S):
        sj = first + tl.arange(0, BLOCK_S)
        m_j = tl.load(m_ptr + row + sj, mask=sj < SPLITS, other=float("-inf"))
        acc = tl.load(acc_ptr + (row + sj[:, None]) * D + di[None, :], mask=(sj < SPLITS)[:, None] & d_ok[None, :],
                      other=0.0)
        acc = tl.where((m_j > float("-inf"))[:, None], acc, 0.0)
        total += tl.sum(tl.exp(m_j - m_max)[:, None] * acc, axis=0)  # exp(-inf) = 0 for the empty splits
    out = total / denom
    tl.store(out_ptr + b * (tl.num_programs(1) * D) + h * D + di, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention(q, k_cache, v_cache, positions, scaling: float, softcap: float | None = None,
                     window: int | None = None) -> torch.Tensor:
    """See the module docstring. q [B, H, 1, D] (last dim contiguous), caches [S >= B, KV, L, D] contiguous,
    positions [B] long (each row's query position, already written into the cache)."""
    b, h, t, d = q.shape
    kv = k_cache.shape[1]
    if (t != 1 or h % kv or q.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or not use_triton(q, k_cache, v_cache)):
        return decode_attention_reference(q, k_cache, v_cache, positions, scaling, softcap, window)
    # an opaque op for torch.compile: inductor calls it as it is (the launch that eager mode makes) instead of
    # re-compiling the Triton kernel inside its own graph
    return torch.ops.fastlm.decode_attention(q, k_cache, v_cache, positions, float(scaling), float(softcap or 0.0),
                                             int(window or 0))


def _op_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
             scaling: float, softcap: float, window: int) -> torch.Tensor:
    return sys.modules[__name__]._launch(q, k_cache, v_cache, positions, scaling, softcap or None, window or None)


def _op_fake(q, k_cache, v_cache, positions, scaling, softcap, window):
    b, h, _, d = q.shape
    return q.new_empty(b, 1, h * d)


register_opaque_op("decode_attention", _op_impl, _op_fake)


def block_sizes(g: int, d: int, use_dot: bool) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_D, BLOCK_L) of the split kernel. With tensor cores the G query heads are padded to 16 rows
    (the smallest dot) and BLOCK_L is 32 keys (sm_90 ptxas: 64 keys spill registers at head dim 128). Without,
    BLOCK_L is 16 or 32 keys so that the fp32 product [BLOCK_G, BLOCK_L, BLOCK_D] stays within PRODUCT_ELEMENTS
    (Llama 4 x 64: 32 keys; 4 x 128 or Gemma 2 x 256: 16; 64 keys at 1 x 128 spill registers)."""
    block_g, block_d = next_pow2(g), next_pow2(d)
    if use_dot:
        return max(16, block_g), block_d, 32
    return block_g, block_d, max(16, min(32, PRODUCT_ELEMENTS // (block_g * block_d)))


def _dot_ok(q: torch.Tensor) -> bool:
    """The tensor-core form on CPU (the interpreter) and on GPUs with bf16 tensor cores (compute capability 8.0 and
    up); older GPUs (e.g. a T4) take the products form, which computes in fp32 registers."""
    return not q.is_cuda or torch.cuda.get_device_capability(q.device) >= (8, 0)


def _launch(q, k_cache, v_cache, positions, scaling, softcap, window, chunk: int | None = None,
            use_dot: bool | None = None):
    """The two launches. `chunk` overrides split_plan's chunk (tests, and the GPU script's sweep); BLOCK_L is then
    lowered to it when longer, and a chunk that is not a multiple of BLOCK_L ends on a masked partial step.
    `use_dot` overrides TENSOR_CORES."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # no copy for the engine's caches
    b, h, t, d = q.shape
    kv, length = k_cache.shape[1], k_cache.shape[2]
    g = h // kv
    use_dot = (TENSOR_CORES and _dot_ok(q)) if use_dot is None else use_dot
    block_g, block_d, block_l = block_sizes(g, d, use_dot)
    chunk, splits, block_l = split_plan(length, window, block_l, chunk)
    if use_dot:
        block_l = max(16, block_l)  # the smallest dot; a shorter chunk ends on masked keys
    m = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    out = torch.empty(b, 1, h * d, dtype=q.dtype, device=q.device)
    pdl = pdl_mode(q.device)
    _decode_attention_split_kernel[(b, kv, splits)](
        q, k_cache, v_cache, positions, m, l_sum, acc, positions.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), length, chunk, splits, float(scaling),
        float(softcap or 1.0), int(window or 0), G=g, BLOCK_G=block_g, D=d, BLOCK_D=block_d, BLOCK_L=block_l,
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, USE_DOT=use_dot,
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", USE_PDL=pdl,
        num_warps=8 if use_dot and block_d >= 256 else 4, **pdl_launch(pdl))
    block_splits = next_pow2(splits)
    _decode_attention_combine_kernel[(b, h)](
        m, l_sum, acc, out, splits, D=d, BLOCK_D=block_d, BLOCK_SPLITS=block_splits,
        BLOCK_S=max(1, min(block_splits, 4096 // block_d)), USE_PDL=pdl, num_warps=4, **pdl_launch(pdl))
    return out
