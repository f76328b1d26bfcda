"""Split-K NF4 GEMV for batch-1 decode: x @ W^T with W read as 4-bit, as fp32 partial sums that the next kernel adds.

    nf4_partials(x [M, K], packed, absmax, code, n, k, blocksize, config) -> [S, M, N] float32

The looping NF4 kernels (decode_nf4.py, decode_nf4_prmt.py) give each program a block of weight rows and walk K in
steps. Here, as in the bf16 split-K GEMV (decode_gemv.py), a program reads one [BLOCK_N rows, BLOCK_K columns] tile
of packed words in a single pass (every load issued before the first decode; with programmatic dependent launch
before the previous kernel has finished) and writes one fp32 partial sum per row: the grid is N/BLOCK_N x K/BLOCK_K
x M, and the decode epilogue that consumes the output adds the S partial sums (kernels/decode_epilogue.py reads
every input y as [S, M, N]). Measured on the H100 (scripts/gpu_nf4_splitk_sweep.py), more loads in flight alone
bought little: the decode is bound by the integer pipe (the byte permutes), with the weights in L2 as in DRAM. What
gained is the asm (`quad_dot_ptx`): four words per call (one scale, one x address), the shifts on the FMA pipe, and
the table-half choice as a lop3 select (14 permutes a word instead of 16).

`nf4_partials_config` times the configs once per shape on the device (each one's output checked against the
float32 reference first) against the looping kernel's time and returns the fastest when it wins, else None.
The arithmetic is the prmt kernels' (bf16 or fp16 products summed in 16-bit pairs per word, float32 across words);
under TRITON_INTERPRET=1 the asm's pure-Triton twin runs (exact float32 products).
"""
from __future__ import annotations

import sys

import torch

from ._triton import HAS_TRITON, interpreter_on, launches_ms, pdl_launch, pdl_mode, pdl_wait, register_opaque_op
from .decode_nf4_prmt import code_regs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .decode_nf4_prmt import _block_rows, _u32, _word_dot_sim, _words


def quad_dot_ptx(f16: bool, lop3_select: bool = True) -> str:
    """The PTX of four consecutive words' decode (32 weights) and their dot product with x, times their common
    absmax scale. Operands: $0 the float32 result; $1..$4 the words; $5 the address of the quad's 32 x values in the
    compute type (16-byte aligned: four 16-byte loads); $6 the address of its float32 scale; $7 the constant
    0x32103210 (in a register so that one lop3 makes a selector: lop3 takes one immediate); $8..$15 L0..L3, H0..H3
    (decode_nf4_prmt's byte tables). Each word's eight products are summed in the two 16-bit lanes of its own
    accumulator (as decode_nf4_prmt's word asm does), the lanes then added in float32; one scale per quad.

    The permutes bound the decode on the H100 (about 2 words a clock per SM at 16 permutes a word, in the sweep),
    so where the cheaper pipes can do the work they do: right shifts as mul.hi and the left one as mul.lo (FMA
    pipe), and with `lop3_select` the second-level choice between entries 0-7 and 8-15 is a bitwise select under a
    byte mask (lop3) instead of a permute: the mask of four codes is one sign-replicating permute of the word and
    the word shifted left by 4 (byte i = 0xff where code i's bit 3 is set), 14 permutes a word instead of 16."""
    fma = "fma.rn.f16x2" if f16 else "fma.rn.bf16x2"
    lines = ["{", ".reg .b32 rq, rs, rt, ra, rb, rlo, rhi, rp0, rp1, racc, rsc, rsum, rm0, rm1;",
             ".reg .b32 " + ", ".join(f"rx{i}" for i in range(16)) + ";"]
    if f16:
        lines += [".reg .b16 rh0, rh1;", ".reg .f32 rf0, rf1;"]
    for j in range(4):
        lines.append(f"ld.global.nc.v4.b32 {{rx{4 * j}, rx{4 * j + 1}, rx{4 * j + 2}, rx{4 * j + 3}}}, "
                     f"[$5+{16 * j}];")
    lines += ["ld.global.nc.b32 rsc, [$6];", "mov.b32 rsum, 0;"]
    lo = [f"${8 + i}" for i in range(4)]
    hi = [f"${12 + i}" for i in range(4)]
    for w in range(4):
        word = f"${1 + w}"
        lines += [f"and.b32 rq, {word}, 0x77777777;", "mov.b32 racc, 0;"]
        if lop3_select:  # byte i of rm0 (rm1): 0xff where bit 3 of code i (code 4 + i) is set
            lines += [f"mul.lo.u32 rt, {word}, 16;", f"prmt.b32 rm0, rt, {word}, 0xD9C8;",
                      f"prmt.b32 rm1, rt, {word}, 0xFBEA;"]
        else:  # rs: nibble i = i + 4 * bit 3 of code i
            lines += [f"mul.hi.u32 rt, {word}, 0x80000000;", "lop3.b32 rs, rt, 0x44444444, $7, 0xEA;"]
        for half in (0, 1):
            if half:
                lines.append("mul.hi.u32 rq, rq, 0x10000;")
                if not lop3_select:
                    lines.append("mul.hi.u32 rs, rs, 0x10000;")
            for dst, tab in (("rlo", lo), ("rhi", hi)):
                lines += [f"prmt.b32 ra, {tab[0]}, {tab[1]}, rq;", f"prmt.b32 rb, {tab[2]}, {tab[3]}, rq;"]
                if lop3_select:  # (ra & ~mask) | (rb & mask)
                    lines.append(f"lop3.b32 {dst}, ra, rb, rm{half}, 0xD8;")
                else:
                    lines.append(f"prmt.b32 {dst}, ra, rb, rs;")
            lines += ["prmt.b32 rp0, rlo, rhi, 0x4051;", "prmt.b32 rp1, rlo, rhi, 0x6273;",
                      f"{fma} racc, rp0, rx{4 * w + 2 * half}, racc;",
                      f"{fma} racc, rp1, rx{4 * w + 2 * half + 1}, racc;"]
        if f16:
            lines += ["mov.b32 {rh0, rh1}, racc;", "cvt.f32.f16 rf0, rh0;", "cvt.f32.f16 rf1, rh1;",
                      "add.f32 rsum, rsum, rf0;", "add.f32 rsum, rsum, rf1;"]
        else:  # a bf16 is the high half of a float32
            lines += ["and.b32 ra, racc, 0xffff0000;", "mul.lo.u32 rb, racc, 0x10000;", "add.f32 rsum, rsum, ra;",
                      "add.f32 rsum, rsum, rb;"]
    lines += ["mul.f32 $0, rsum, rsc;", "}"]
    return "\n".join(lines)


_QUAD_CONSTRAINTS = "=r,r,r,r,r,l,l,r," + ",".join(["r"] * 8)

# (BLOCK_N, BLOCK_K, num_warps, LOP3): a program reads BLOCK_N x BLOCK_K / 8 int32 words (2-32 KB), 8-32 words a
# thread; LOP3 1: the lop3-select asm, 0: the all-permute one (see quad_dot_ptx)
_BLOCKS = [(8, 512, 2), (16, 512, 2), (16, 512, 4), (32, 512, 4), (32, 512, 2), (4, 1024, 2), (8, 1024, 2),
           (8, 1024, 4), (16, 1024, 4), (32, 1024, 4), (32, 1024, 8), (4, 2048, 4), (8, 2048, 4), (16, 2048, 4),
           (16, 2048, 8), (8, 4096, 4), (8, 4096, 8)]
CONFIGS = [(*b, 1) for b in _BLOCKS] + [(*b, 0) for b in _BLOCKS]
INTERPRETER_CONFIG = (64, 128, 1, 1)  # few programs: the interpreter runs each in Python
_TUNED: dict[tuple, tuple | None] = {}


if HAS_TRITON:
    _PTX_QUAD_BF16 = tl.constexpr(quad_dot_ptx(False))
    _PTX_QUAD_F16 = tl.constexpr(quad_dot_ptx(True))
    _PTX_QUAD_BF16_P = tl.constexpr(quad_dot_ptx(False, False))
    _PTX_QUAD_F16_P = tl.constexpr(quad_dot_ptx(True, False))
    _QUAD_CONSTR = tl.constexpr(_QUAD_CONSTRAINTS)

    @triton.jit
    def _quad_dot(q0, q1, q2, q3, xq, sq, sel, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr,
                  USE_ASM: tl.constexpr, LOP3: tl.constexpr):
        """float32 dot of each quad of words (q0..q3) with its 32 x values, times its scale; all args one shape.
        xq: int32 pointers to the quad's x pairs; sq: float32 pointers to its scale; sel: 0x32103210. LOP3: the
        lop3-select asm (see quad_dot_ptx)."""
        if USE_ASM:
            args = [q0, q1, q2, q3, xq, sq, sel, l0, l1, l2, l3, h0, h1, h2, h3]
            if LOP3:
                if F16:
                    return tl.inline_asm_elementwise(_PTX_QUAD_F16, _QUAD_CONSTR, args, dtype=tl.float32,
                                                     is_pure=True, pack=1)
                return tl.inline_asm_elementwise(_PTX_QUAD_BF16, _QUAD_CONSTR, args, dtype=tl.float32, is_pure=True,
                                                 pack=1)
            if F16:
                return tl.inline_asm_elementwise(_PTX_QUAD_F16_P, _QUAD_CONSTR, args, dtype=tl.float32,
                                                 is_pure=True, pack=1)
            return tl.inline_asm_elementwise(_PTX_QUAD_BF16_P, _QUAD_CONSTR, args, dtype=tl.float32, is_pure=True,
                                             pack=1)
        tot = tl.zeros(q0.shape, dtype=tl.float32)
        for j in tl.static_range(4):
            q = q0 if j == 0 else (q1 if j == 1 else (q2 if j == 2 else q3))
            tot += _word_dot_sim(q, _u32(tl.load(xq + 4 * j)), _u32(tl.load(xq + 4 * j + 1)),
                                 _u32(tl.load(xq + 4 * j + 2)), _u32(tl.load(xq + 4 * j + 3)), _u32(l0), _u32(l1),
                                 _u32(l2), _u32(l3), _u32(h0), _u32(h1), _u32(h2), _u32(h3), F16)
        return tot * tl.load(sq)

    @triton.jit
    def _nf4_partials_kernel(x_ptr, w_ptr, absmax_ptr, regs_ptr, out_ptr, N, K, words_per_row, n_scales, stride_os,
                             BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                             F16: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr, IDX32: tl.constexpr,
                             USE_PDL: tl.constexpr, LOP3: tl.constexpr = True):
        # EVEN: words_per_row % BLOCK_W == 0 (no word past a row's end). x is read as int32 pairs of the 16-bit
        # compute type (x_ptr typed int32); the packed weights are never written, so they are loaded before pdl_wait.
        # Words come in quads (4 consecutive words, one 16-byte load; blocksize % 32 == 0, so one scale per quad).
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        m = tl.program_id(2)
        WPB: tl.constexpr = BLOCKSIZE // 8
        BLOCK_Q: tl.constexpr = BLOCK_W // 4
        rows, row_ok, row_words, zero = _block_rows(pid_n, N, words_per_row, BLOCK_N, BLOCK_W, IDX32)
        word = _words(w_ptr, row_words, row_ok, split * BLOCK_W, words_per_row, BLOCK_W, EVEN)
        pdl_wait(USE_PDL)
        # word 4q + 2i + j of the tile at [:, q, i, j]: the splits give words 4q, 4q + 2 (a) and 4q + 1, 4q + 3 (b)
        a, b = tl.split(tl.reshape(word, [BLOCK_N, BLOCK_Q, 2, 2]))
        q0, q2 = tl.split(a)
        q1, q3 = tl.split(b)
        qi = split * BLOCK_Q + tl.arange(0, BLOCK_Q)  # quad index in the row
        # the byte tables as values the compiler cannot prove uniform (salt is 0), once per column of a thread's
        # quads (decode_nf4_prmt._tables explains why not scalars)
        salt = (qi.to(tl.int64) * words_per_row >> 62).to(tl.int32)[None, :]
        l0 = tl.load(regs_ptr) ^ salt
        l1 = tl.load(regs_ptr + 1) ^ salt
        l2 = tl.load(regs_ptr + 2) ^ salt
        l3 = tl.load(regs_ptr + 3) ^ salt
        h0 = tl.load(regs_ptr + 4) ^ salt
        h1 = tl.load(regs_ptr + 5) ^ salt
        h2 = tl.load(regs_ptr + 6) ^ salt
        h3 = tl.load(regs_ptr + 7) ^ salt
        sel = 0x32103210 ^ salt
        # rows past N read word 0 and a clamped scale index (their sums are not stored); quads past the row's end
        # read x at its last quad and are dropped
        if IDX32:
            sidx = ((row_words + 4 * qi[None, :]).to(tl.uint32, bitcast=True) // WPB).to(tl.int32, bitcast=True)
        else:
            sidx = (row_words + 4 * qi[None, :]) // WPB
        sidx = tl.minimum(sidx, n_scales - 1).to(tl.int32)
        xrow = x_ptr + m * (K // 2)
        if EVEN:
            xq = xrow + 16 * qi[None, :]
        else:
            xq = xrow + 16 * tl.minimum(qi, words_per_row // 4 - 1)[None, :]
        part = _quad_dot(q0, q1, q2, q3, tl.broadcast_to(xq, [BLOCK_N, BLOCK_Q]), absmax_ptr + sidx,
                         tl.broadcast_to(sel, [BLOCK_N, BLOCK_Q]), tl.broadcast_to(l0, [BLOCK_N, BLOCK_Q]),
                         tl.broadcast_to(l1, [BLOCK_N, BLOCK_Q]), tl.broadcast_to(l2, [BLOCK_N, BLOCK_Q]),
                         tl.broadcast_to(l3, [BLOCK_N, BLOCK_Q]), tl.broadcast_to(h0, [BLOCK_N, BLOCK_Q]),
                         tl.broadcast_to(h1, [BLOCK_N, BLOCK_Q]), tl.broadcast_to(h2, [BLOCK_N, BLOCK_Q]),
                         tl.broadcast_to(h3, [BLOCK_N, BLOCK_Q]), F16, USE_ASM, LOP3)
        if not EVEN:
            part = tl.where((qi < words_per_row // 4)[None, :], part, 0.0)
        tl.store(out_ptr + split * stride_os + m * N + rows, tl.sum(part, axis=1), mask=row_ok)


def splits(k: int, cfg: tuple) -> int:
    return -(-k // cfg[1])


def _check(cfg) -> tuple:
    """(BLOCK_N, BLOCK_K, num_warps, LOP3); a 3-tuple means LOP3 = 1 (the lop3-select asm)."""
    cfg = tuple(int(c) for c in cfg)
    if len(cfg) == 3:
        cfg = (*cfg, 1)
    if len(cfg) != 4 or any(c < 1 or c & (c - 1) for c in cfg[:3]) or cfg[1] < 32 or cfg[3] not in (0, 1):
        raise ValueError(f"nf4_partials config {cfg!r}: expected (BLOCK_N, BLOCK_K, num_warps[, LOP3]), powers of "
                         "two with BLOCK_K >= 32 and LOP3 0 or 1; get one from nf4_partials_config()")
    return cfg


def _launch(x, packed, absmax, code, out, n, k, blocksize, cfg) -> None:
    bn, bk, warps, lop3 = _check(cfg)
    f16 = x.dtype == torch.float16
    if x.dtype not in (torch.bfloat16, torch.float16) or x.data_ptr() % 16 or not x.is_contiguous():
        # the asm reads x as 16-byte vectors of the compute type
        x = x.to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
    wpr = k // 8
    bw = bk // 8
    pdl = pdl_mode(packed.device)
    idx32 = (triton.cdiv(n, bn) * bn + 1) * wpr < 2 ** 31
    _nf4_partials_kernel[(triton.cdiv(n, bn), out.shape[0], x.shape[0])](
        x.view(torch.int32), packed.view(torch.int32), absmax, code_regs(code, f16), out, n, k, wpr,
        absmax.numel(), out.stride(0), BLOCKSIZE=blocksize, BLOCK_N=bn, BLOCK_W=bw, F16=f16, EVEN=wpr % bw == 0,
        USE_ASM=not interpreter_on(), IDX32=idx32, USE_PDL=pdl, LOP3=bool(lop3), num_warps=warps, **pdl_launch(pdl))


def fits(k: int, blocksize: int, packed: torch.Tensor, code: torch.Tensor) -> bool:
    """Whole quads of int32 words in a row and in a scale block (K and blocksize multiples of 32), aligned bytes, a
    16-entry code."""
    return (HAS_TRITON and k % 32 == 0 and blocksize % 32 == 0 and packed.data_ptr() % 16 == 0
            and code.numel() == 16)


def nf4_partials_config(n: int, k: int, blocksize: int, packed: torch.Tensor, code: torch.Tensor,
                        dtype=torch.bfloat16, max_splits: int = 16, loop_config: tuple | None = None,
                        rows: int = 1) -> tuple | None:
    """The fastest (BLOCK_N, BLOCK_K, num_warps, LOP3) for this shape with at most `max_splits` partial sums, timed
    on the device (20 launches in a CUDA graph; every config's output first checked against the float32 reference)
    when it beats the looping kernel's `loop_config` (decode_nf4's, timed the same way on the same inputs); None
    otherwise, off CUDA, or for bytes the kernel does not read (see fits). A fixed config under the interpreter.
    Call it outside torch.compile."""
    if not fits(k, blocksize, packed, code) or dtype not in (torch.bfloat16, torch.float16):
        return None
    if interpreter_on():
        return INTERPRETER_CONFIG if splits(k, INTERPRETER_CONFIG) <= max_splits else None
    if packed.device.type != "cuda":
        return None
    key = (n, k, blocksize, rows, str(packed.device), dtype, max_splits, loop_config)
    if key in _TUNED:
        return _TUNED[key]
    from . import decode_nf4 as d

    x, packed_t, absmax_t, code_t = d.tune_inputs(n, k, blocksize, packed.device, rows, dtype)
    ref = d.nf4_gemv_reference(x, packed_t, absmax_t, code_t, n, k, blocksize).float()
    best_ms, best = float("inf"), None
    if loop_config is not None:
        y = torch.empty(rows, n, device=packed.device, dtype=dtype)
        best_ms = launches_ms(lambda: d._launch(x, packed_t, absmax_t, code_t, y, n, k, blocksize, loop_config),
                              warm=2)
    for cfg in CONFIGS:
        s = splits(k, cfg)
        if s > max_splits or cfg[1] > 8 * k:
            continue
        out = torch.empty(s, rows, n, device=packed.device, dtype=torch.float32)
        try:
            _launch(x, packed_t, absmax_t, code_t, out, n, k, blocksize, cfg)
            if not d.relative_error(out.sum(0), ref) <= d.TUNE_MAX_ERROR:
                continue
            ms = launches_ms(lambda c=cfg: _launch(x, packed_t, absmax_t, code_t, out, n, k, blocksize, c), warm=2)
        except Exception:  # noqa: BLE001 - a config this device cannot compile or run is skipped
            continue
        if ms < best_ms:
            best_ms, best = ms, cfg
    _TUNED[key] = best
    return best


def _op_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
             blocksize: int, block_n: int, block_k: int, warps: int, lop3: int) -> torch.Tensor:
    cfg = (block_n, block_k, warps, lop3)
    out = torch.empty(splits(k, cfg), x.shape[0], n, device=x.device, dtype=torch.float32)
    sys.modules[__name__]._launch(x.contiguous(), packed, absmax, code, out, n, k, blocksize, cfg)
    return out


def _op_fake(x, packed, absmax, code, n, k, blocksize, block_n, block_k, warps, lop3):
    return x.new_empty(splits(k, (block_n, block_k)), x.shape[0], n, dtype=torch.float32)


if HAS_TRITON:
    register_opaque_op("nf4_partials", _op_impl, _op_fake)


def nf4_partials(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
                 blocksize: int, config: tuple) -> torch.Tensor:
    """x [M, K] @ W^T as [S, M, N] float32 partial sums, W the NF4 bytes `packed` with float32 `absmax` per
    `blocksize` elements and the 16-entry `code` table; config from nf4_partials_config."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_partials needs triton (CUDA, or TRITON_INTERPRET=1 on CPU); use "
                           "decode_nf4.nf4_gemv_reference without it")
    return torch.ops.fastlm.nf4_partials(x, packed.reshape(-1), absmax, code.float(), n, k, blocksize, *_check(config))


__all__ = ["nf4_partials", "nf4_partials_config", "CONFIGS"]
