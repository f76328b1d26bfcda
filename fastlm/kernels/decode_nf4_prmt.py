"""NF4 dequant-GEMV variants that decode the 4-bit codes in registers with PTX byte permutes (`prmt.b32`).

The word kernel in decode_nf4.py looks each code up in the 16-entry float32 table in memory (an L1 gather per
weight: shift, mask, address, load, then a bf16->fp32 convert of x and an FMA). These variants keep the 16 code
values as 16-bit floats (bf16, or fp16) split into byte tables held in eight 32-bit registers:

    L0..L3: the low bytes of entries 0-3, 4-7, 8-11, 12-15 (byte j of Lr = low byte of entry 4r+j)
    H0..H3: the high bytes, laid out the same way

and decode one int32 word of packed bytes (eight weights) with 16 permutes and no memory access:

    q7  = word & 0x77777777                       (the 3 low bits of every code: prmt's byte selectors; bit 3 of a
                                                   selector nibble would ask prmt to replicate a sign instead)
    sel = ((word >> 1) & 0x44444444) | 0x32103210 (nibble i = i + 4 * bit3(code i): picks candidate byte i from
                                                   the first (entries 0-7) or second (8-15) candidate register)
    per half of the word (codes 0-3, then q7 >> 16 and sel >> 16 for codes 4-7):
        lo = prmt(prmt(L0, L1, q7), prmt(L2, L3, q7), sel)   low bytes of the four values
        hi = prmt(prmt(H0, H1, q7), prmt(H2, H3, q7), sel)   high bytes
        p0 = prmt(lo, hi, 0x4051), p1 = prmt(lo, hi, 0x6273) the values as 16-bit pairs in weight order
    four packed FMAs (`fma.rn.bf16x2` / `fma.rn.f16x2`) with x read as pairs, then the pair sum as float32.

Weight order: bitsandbytes puts a byte's first weight in its high nibble and the bytes of a word are little-endian,
so weight j of a word is code nibble j ^ 1; selector 0x4051 puts nibble 1 (weight 0) in the low half of p0 and
nibble 0 (weight 1) in its high half, as x's pair (x[8w], x[8w+1]) is laid out.

In variants 1 and 2 the asm also reads the word's four x pairs (one 16-byte load) and its absmax scale itself:
Triton loads of either get layouts other than the words', which the compiler reconciles through shared memory with
barriers every step. Compiled for sm_90 (ptxas, on CPU) the loop is 35-41 SASS instructions per word (16 of them
permutes), no barrier, under triton 3.6 and 3.9. With 2-4 rows of x one asm serves them all (rows_dot_ptx: one
decode, a result per row).

Accuracy: the table is rounded to bf16 (or fp16), each product is rounded and a word's eight products are summed in
two 16-bit lanes before the float32 accumulation across K, and the per-block absmax scale is applied in float32.
bf16 rounds the weights as bitsandbytes' own path does (it dequantizes to bf16 before its matmul), measured at about
2x the word kernel's relative error (~3e-3 vs ~1.5e-3 with a bf16 output); fp16 keeps 3 more bits (variant 2, for
fp16 x: a bf16 x would be converted every call and could overflow past 65504).

Inline PTX cannot run under TRITON_INTERPRET=1, so each asm has a pure-Triton twin (`USE_ASM=False`) that runs the
same byte algorithm with prmt simulated in integer ops (and exact float32 arithmetic): the CPU tests run every piece
of these kernels but the asm lines, and tests/kernels/test_decode_nf4_prmt.py runs the PTX text itself through a
small simulator of the instructions it uses.
"""
from __future__ import annotations

import torch

from ._triton import pdl_launch, pdl_mode, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: decode_nf4 serves the reference
    triton = None

# the variants this module adds: id -> (name, F16, X_IN_ASM, SCALE_IN_ASM). X_IN_ASM: the asm reads the word's four
# x pairs itself with one 16-byte load from an address operand (x in the compute dtype; x is L1-resident), so x needs
# no Triton load whose layout differs from the words' (the compiler moves such [BLOCK_W] loads into the words' layout
# through shared memory with barriers, every step); otherwise Triton loads them (four 4-byte loads per word).
# SCALE_IN_ASM: the asm also reads the word's absmax scale and multiplies (Triton 3.6 otherwise moves every step's
# products into the scale load's layout through shared memory; 3.9 does not).
PRMT_VARIANTS = {1: ("prmt-bf16", False, True, True), 2: ("prmt-f16", True, True, True),
                 3: ("prmt-bf16-tlx", False, False, False), 4: ("prmt-bf16-tls", False, True, False)}


def _decode_half_ptx(t: int) -> list[str]:
    """Four codes (the low 16 bits of rq, rs) -> rp0, rp1: their values as 16-bit pairs; tables at $t..$t+7."""
    lo = [f"${t + i}" for i in range(4)]
    hi = [f"${t + 4 + i}" for i in range(4)]
    return [f"prmt.b32 ra, {lo[0]}, {lo[1]}, rq;", f"prmt.b32 rb, {lo[2]}, {lo[3]}, rq;", "prmt.b32 rlo, ra, rb, rs;",
            f"prmt.b32 ra, {hi[0]}, {hi[1]}, rq;", f"prmt.b32 rb, {hi[2]}, {hi[3]}, rq;", "prmt.b32 rhi, ra, rb, rs;",
            "prmt.b32 rp0, rlo, rhi, 0x4051;", "prmt.b32 rp1, rlo, rhi, 0x6273;"]


_SELECTORS_PTX = ["and.b32 rq, {q}, 0x77777777;", "shr.u32 rs, {q}, 1;", "and.b32 rs, rs, 0x44444444;",
                  "or.b32 rs, rs, 0x32103210;"]


def _half_ptx(xa: str, xb: str, fma: str, t: int) -> list[str]:
    return _decode_half_ptx(t) + [f"{fma} racc, rp0, {xa}, racc;", f"{fma} racc, rp1, {xb}, racc;"]


def _to_f32_ptx(f16: bool, acc: str, out: str) -> list[str]:
    """The two 16-bit lanes of acc summed as float32 into out (uses ra, rb / rh0, rh1, rf0, rf1)."""
    if f16:
        return [f"mov.b32 {{rh0, rh1}}, {acc};", "cvt.f32.f16 rf0, rh0;", "cvt.f32.f16 rf1, rh1;",
                f"add.f32 {out}, rf0, rf1;"]
    return [f"and.b32 ra, {acc}, 0xffff0000;", f"shl.b32 rb, {acc}, 16;", f"add.f32 {out}, ra, rb;"]


def rows_dot_ptx(f16: bool, rows: int) -> str:
    """The PTX of one word's decode and its dot products with `rows` rows of x, each times the word's scale.
    Operands: $0..$rows-1 the float32 results; then the packed word, the word's index in its row, the address of
    the first x row (16-byte aligned) and the bytes between rows (64-bit), the scale's index and the absmax address,
    then L0..L3, H0..H3. The decode (16 permutes) is shared by the rows."""
    fma = "fma.rn.f16x2" if f16 else "fma.rn.bf16x2"
    q, widx, xrow, xstride, sidx, abase = (f"${rows + i}" for i in range(6))
    t = rows + 6
    lines = ["{", ".reg .b32 rq, rs, ra, rb, rlo, rhi, rp0, rp1, rsc;", ".reg .b64 rxa, rsa;",
             ".reg .b32 " + ", ".join(f"racc{r}" for r in range(rows)) + ";",
             ".reg .b32 " + ", ".join(f"rx{r}{j}" for r in range(rows) for j in range(4)) + ";"]
    if f16:
        lines += [".reg .b16 rh0, rh1;", ".reg .f32 rf0, rf1;"]
    lines.append(f"mad.wide.u32 rxa, {widx}, 16, {xrow};")
    for r in range(rows):
        if r:
            lines.append(f"add.s64 rxa, rxa, {xstride};")
        lines += [f"ld.global.nc.v4.b32 {{rx{r}0, rx{r}1, rx{r}2, rx{r}3}}, [rxa];", f"mov.b32 racc{r}, 0;"]
    lines += [f"mad.wide.u32 rsa, {sidx}, 4, {abase};", "ld.global.nc.b32 rsc, [rsa];"]
    lines += [line.format(q=q) for line in _SELECTORS_PTX]
    for half in (0, 1):
        if half:
            lines += ["shr.u32 rq, rq, 16;", "shr.u32 rs, rs, 16;"]
        lines += _decode_half_ptx(t)
        for r in range(rows):
            lines += [f"{fma} racc{r}, rp0, rx{r}{2 * half}, racc{r};",
                      f"{fma} racc{r}, rp1, rx{r}{2 * half + 1}, racc{r};"]
    for r in range(rows):
        lines += _to_f32_ptx(f16, f"racc{r}", "ra") + [f"mul.f32 ${r}, ra, rsc;"]
    lines.append("}")
    return "\n".join(lines)


def word_dot_ptx(f16: bool, x_in_asm: bool, scale_in_asm: bool = False) -> str:
    """The PTX of one word's decode and dot product. Operands: $0 the float32 result, $1 the packed word, then x:
    with x_in_asm $2 the word's index in its row and $3 the address of the row of x (16-byte aligned; the word's
    four pairs are read with one vector load at $3 + 16 * $2), otherwise $2..$5 the four pairs; with scale_in_asm
    (needs x_in_asm) then the index of the word's scale and the address of the float32 absmax (the result is
    multiplied by it); then L0..L3, H0..H3 (see the module docstring)."""
    if scale_in_asm and not x_in_asm:
        raise ValueError("scale_in_asm needs x_in_asm")
    fma = "fma.rn.f16x2" if f16 else "fma.rn.bf16x2"
    lines = ["{", ".reg .b32 rq, rs, ra, rb, rlo, rhi, rp0, rp1, racc;"]
    if x_in_asm:
        lines += [".reg .b32 rx0, rx1, rx2, rx3;", ".reg .b64 rxa;", "mad.wide.u32 rxa, $2, 16, $3;",
                  "ld.global.nc.v4.b32 {rx0, rx1, rx2, rx3}, [rxa];"]
        xs, t = ["rx0", "rx1", "rx2", "rx3"], 4
        if scale_in_asm:
            lines += [".reg .b32 rsc;", ".reg .b64 rsa;", "mad.wide.u32 rsa, $4, 4, $5;",
                      "ld.global.nc.b32 rsc, [rsa];"]
            t = 6
    else:
        xs, t = ["$2", "$3", "$4", "$5"], 6
    if f16:
        lines.append(".reg .b16 rh0, rh1;")
        lines.append(".reg .f32 rf0, rf1;")
    lines += [line.format(q="$1") for line in _SELECTORS_PTX] + ["mov.b32 racc, 0;"]
    lines += _half_ptx(xs[0], xs[1], fma, t)
    lines += ["shr.u32 rq, rq, 16;", "shr.u32 rs, rs, 16;"]
    lines += _half_ptx(xs[2], xs[3], fma, t)
    lines += _to_f32_ptx(f16, "racc", "ra" if scale_in_asm else "$0")  # a bf16 is the high half of a float32
    if scale_in_asm:
        lines.append("mul.f32 $0, ra, rsc;")
    lines.append("}")
    return "\n".join(lines)


_CONSTRAINTS = "=r," + ",".join(["r"] * 13)
_CONSTRAINTS_XA = "=r,r,r,l," + ",".join(["r"] * 8)
_CONSTRAINTS_XS = "=r,r,r,l,r,l," + ",".join(["r"] * 8)


def _rows_constraints(rows: int) -> str:
    return ",".join(["=r"] * rows) + ",r,r,l,l,r,l," + ",".join(["r"] * 8)


ROWS_KERNEL = True  # 2-4 rows of x: variants 1 and 2 decode each word once for all rows (rows_dot_ptx)


def code_regs_uncached(code: torch.Tensor, f16: bool) -> torch.Tensor:
    """The eight int32 byte-table registers L0..L3, H0..H3 of a 16-entry code table (see the module docstring)."""
    if code.numel() != 16:
        raise ValueError(f"the prmt NF4 variants need a 16-entry code table, got {code.numel()} entries; "
                         "use variant 0 (the word kernel) for other tables")
    half = code.reshape(-1).float().to(torch.float16 if f16 else torch.bfloat16)
    bits = half.view(torch.int16).to(torch.int64) & 0xFFFF
    shifts = torch.tensor([0, 8, 16, 24], device=code.device, dtype=torch.int64)
    regs = torch.cat([((bits & 0xFF).view(4, 4) << shifts).sum(1), ((bits >> 8).view(4, 4) << shifts).sum(1)])
    return torch.where(regs >= 2 ** 31, regs - 2 ** 32, regs).to(torch.int32)


_REGS: dict[tuple, tuple] = {}


def code_regs(code: torch.Tensor, f16: bool) -> torch.Tensor:
    """code_regs_uncached, remembered per code tensor (its address and version; the entry holds the tensor, so the
    address cannot be reused by another while remembered). Not stored while a CUDA graph is being captured: the
    table is then computed inside the graph."""
    key = (code.data_ptr(), code._version, str(code.device), bool(f16))
    hit = _REGS.get(key)
    if hit is not None:
        return hit[1]
    regs = code_regs_uncached(code, f16)
    if code.is_cuda and torch.cuda.is_current_stream_capturing():
        return regs
    if len(_REGS) > 256:
        _REGS.clear()
    _REGS[key] = (code, regs)
    return regs


if triton is not None:
    _PTX_BF16 = tl.constexpr(word_dot_ptx(False, False))
    _PTX_BF16_XA = tl.constexpr(word_dot_ptx(False, True))
    _PTX_BF16_XS = tl.constexpr(word_dot_ptx(False, True, True))
    _PTX_F16_XS = tl.constexpr(word_dot_ptx(True, True, True))
    _CONSTR = tl.constexpr(_CONSTRAINTS)
    _CONSTR_XA = tl.constexpr(_CONSTRAINTS_XA)
    _CONSTR_XS = tl.constexpr(_CONSTRAINTS_XS)
    _PTX_BF16_R2 = tl.constexpr(rows_dot_ptx(False, 2))
    _PTX_BF16_R4 = tl.constexpr(rows_dot_ptx(False, 4))
    _PTX_F16_R2 = tl.constexpr(rows_dot_ptx(True, 2))
    _PTX_F16_R4 = tl.constexpr(rows_dot_ptx(True, 4))
    _CONSTR_R2 = tl.constexpr(_rows_constraints(2))
    _CONSTR_R4 = tl.constexpr(_rows_constraints(4))

    @triton.jit
    def _words(w_ptr, row_words, row_ok, w0, words_per_row, BLOCK_W: tl.constexpr, IN_ROW: tl.constexpr = False):
        """[BLOCK_N, BLOCK_W] int32 words of packed bytes from word w0 of each row (0 past the ends; IN_ROW: the
        caller knows w0 + BLOCK_W <= words_per_row)."""
        wi = w0 + tl.arange(0, BLOCK_W)
        if IN_ROW:
            return tl.load(w_ptr + row_words + wi[None, :], mask=row_ok[:, None], other=0)
        return tl.load(w_ptr + row_words + wi[None, :], mask=row_ok[:, None] & (wi < words_per_row)[None, :], other=0)

    @triton.jit
    def _prmt_sim(a, b, c):
        """prmt.b32 d, a, b, c in its generic form, on uint32 values (the PTX ISA's semantics): byte i of d is
        byte (c >> 4i) & 7 of {b, a}, or that byte's sign bit replicated when (c >> 4i) & 8."""
        d = tl.zeros_like(c)
        for i in tl.static_range(4):
            s = (c >> (4 * i)) & 15
            idx = s & 7
            src = tl.where(idx < 4, a, b)
            byte = (src >> ((idx & 3) * 8)) & 255
            byte = tl.where((s & 8) != 0, tl.where((byte & 128) != 0, 255, 0).to(tl.uint32), byte)
            d = d | (byte << (8 * i))
        return d

    @triton.jit
    def _half_value(p, F16: tl.constexpr):
        """The 16-bit float in the low half of uint32 p, as float32."""
        if F16:
            return (p & 65535).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return ((p & 65535) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _pair_dot(p, xp, F16: tl.constexpr):
        return (_half_value(p, F16) * _half_value(xp, F16) + _half_value(p >> 16, F16) * _half_value(xp >> 16, F16))

    @triton.jit
    def _word_dot_sim(q, x0, x1, x2, x3, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr):
        """The pure-Triton twin of the PTX: the same selectors and permutes, exact float32 products and sums."""
        u = q.to(tl.uint32, bitcast=True)
        rq = u & 0x77777777
        rs = ((u >> 1) & 0x44444444) | 0x32103210
        tot = tl.zeros(q.shape, dtype=tl.float32)
        for half in tl.static_range(2):
            if half == 1:
                rq = rq >> 16
                rs = rs >> 16
            lo = _prmt_sim(_prmt_sim(l0, l1, rq), _prmt_sim(l2, l3, rq), rs)
            hi = _prmt_sim(_prmt_sim(h0, h1, rq), _prmt_sim(h2, h3, rq), rs)
            p0 = _prmt_sim(lo, hi, tl.full(q.shape, 0x4051, tl.uint32))
            p1 = _prmt_sim(lo, hi, tl.full(q.shape, 0x6273, tl.uint32))
            if half == 0:
                tot += _pair_dot(p0, x0, F16) + _pair_dot(p1, x1, F16)
            else:
                tot += _pair_dot(p0, x2, F16) + _pair_dot(p1, x3, F16)
        return tot

    @triton.jit
    def _u32(v):
        return v.to(tl.uint32, bitcast=True)

    @triton.jit
    def _word_dot(q, x0, x1, x2, x3, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr, USE_ASM: tl.constexpr):
        """float32 dot of each int32 word's eight weights (as table values) with its four x pairs (int32); all args
        the word's shape. Twin of the PTX with x pairs as operands (variant 3)."""
        if USE_ASM:
            tl.static_assert(not F16, "the x-operand PTX is bf16 only")
            return tl.inline_asm_elementwise(_PTX_BF16, _CONSTR, [q, x0, x1, x2, x3, l0, l1, l2, l3, h0, h1, h2, h3],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return _word_dot_sim(q, _u32(x0), _u32(x1), _u32(x2), _u32(x3), _u32(l0), _u32(l1), _u32(l2), _u32(l3),
                             _u32(h0), _u32(h1), _u32(h2), _u32(h3), F16)

    @triton.jit
    def _word_dot_xa(q, widx, xrow, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr, USE_ASM: tl.constexpr):
        """_word_dot with the asm reading the word's x pairs itself: xrow (int32 pointers, all the same: x's row as
        int32 pairs, 16-byte aligned) + 4 * widx (the word's index in the row). The twin loads them with tl.load."""
        if USE_ASM:
            tl.static_assert(not F16, "the x-in-asm PTX without the scale is bf16 only")
            return tl.inline_asm_elementwise(_PTX_BF16_XA, _CONSTR_XA, [q, widx, xrow, l0, l1, l2, l3, h0, h1, h2, h3],
                                             dtype=tl.float32, is_pure=True, pack=1)
        xq = xrow + widx * 4
        return _word_dot_sim(q, _u32(tl.load(xq)), _u32(tl.load(xq + 1)), _u32(tl.load(xq + 2)), _u32(tl.load(xq + 3)),
                             _u32(l0), _u32(l1), _u32(l2), _u32(l3), _u32(h0), _u32(h1), _u32(h2), _u32(h3), F16)

    @triton.jit
    def _word_dot_xs(q, widx, xrow, sidx, arow, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr,
                     USE_ASM: tl.constexpr):
        """_word_dot_xa times the word's scale, which the asm reads too: arow (float32 pointers, all the absmax
        base) + sidx (the scale's index)."""
        if USE_ASM:
            args = [q, widx, xrow, sidx, arow, l0, l1, l2, l3, h0, h1, h2, h3]
            if F16:
                return tl.inline_asm_elementwise(_PTX_F16_XS, _CONSTR_XS, args, dtype=tl.float32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise(_PTX_BF16_XS, _CONSTR_XS, args, dtype=tl.float32, is_pure=True, pack=1)
        xq = xrow + widx * 4
        dot = _word_dot_sim(q, _u32(tl.load(xq)), _u32(tl.load(xq + 1)), _u32(tl.load(xq + 2)), _u32(tl.load(xq + 3)),
                            _u32(l0), _u32(l1), _u32(l2), _u32(l3), _u32(h0), _u32(h1), _u32(h2), _u32(h3), F16)
        return dot * tl.load(arow + sidx)

    @triton.jit
    def _row_dot_sim(q, widx, xrow, r, xpairs, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr):
        xq = xrow + r * xpairs + widx * 4
        return _word_dot_sim(q, _u32(tl.load(xq)), _u32(tl.load(xq + 1)), _u32(tl.load(xq + 2)), _u32(tl.load(xq + 3)),
                             _u32(l0), _u32(l1), _u32(l2), _u32(l3), _u32(h0), _u32(h1), _u32(h2), _u32(h3), F16)

    @triton.jit
    def _rows_dot2(q, widx, xrow, xstride, xpairs, sidx, arow, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr,
                   USE_ASM: tl.constexpr):
        """_word_dot_xs for 2 rows of x at once (xstride bytes apart; xpairs int32 pairs apart for the twin), each
        word decoded once: a pair of float32 tensors. (One function per row count: triton 3.6 wants one return
        type per function, constexpr branches included.)"""
        if USE_ASM:
            args = [q, widx, xrow, xstride, sidx, arow, l0, l1, l2, l3, h0, h1, h2, h3]
            if F16:
                return tl.inline_asm_elementwise(_PTX_F16_R2, _CONSTR_R2, args, dtype=(tl.float32, tl.float32),
                                                 is_pure=True, pack=1)
            return tl.inline_asm_elementwise(_PTX_BF16_R2, _CONSTR_R2, args, dtype=(tl.float32, tl.float32),
                                             is_pure=True, pack=1)
        s = tl.load(arow + sidx)
        return (_row_dot_sim(q, widx, xrow, 0, xpairs, l0, l1, l2, l3, h0, h1, h2, h3, F16) * s,
                _row_dot_sim(q, widx, xrow, 1, xpairs, l0, l1, l2, l3, h0, h1, h2, h3, F16) * s)

    @triton.jit
    def _rows_dot4(q, widx, xrow, xstride, xpairs, sidx, arow, l0, l1, l2, l3, h0, h1, h2, h3, F16: tl.constexpr,
                   USE_ASM: tl.constexpr):
        """_rows_dot2 for 4 rows."""
        if USE_ASM:
            args = [q, widx, xrow, xstride, sidx, arow, l0, l1, l2, l3, h0, h1, h2, h3]
            if F16:
                return tl.inline_asm_elementwise(_PTX_F16_R4, _CONSTR_R4, args,
                                                 dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                                 is_pure=True, pack=1)
            return tl.inline_asm_elementwise(_PTX_BF16_R4, _CONSTR_R4, args,
                                             dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
                                             pack=1)
        s = tl.load(arow + sidx)
        return (_row_dot_sim(q, widx, xrow, 0, xpairs, l0, l1, l2, l3, h0, h1, h2, h3, F16) * s,
                _row_dot_sim(q, widx, xrow, 1, xpairs, l0, l1, l2, l3, h0, h1, h2, h3, F16) * s,
                _row_dot_sim(q, widx, xrow, 2, xpairs, l0, l1, l2, l3, h0, h1, h2, h3, F16) * s,
                _row_dot_sim(q, widx, xrow, 3, xpairs, l0, l1, l2, l3, h0, h1, h2, h3, F16) * s)

    @triton.jit
    def _bits16(v, F16: tl.constexpr):
        """float32 v rounded to fp16 / bf16 (nearest even, in integer ops: exact under the interpreter too), as the
        16-bit pattern in an int32."""
        if F16:
            return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
        u = v.to(tl.uint32, bitcast=True)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int32, bitcast=True)

    @triton.jit
    def _pack2(a, b, F16: tl.constexpr):
        return _bits16(a, F16) | (_bits16(b, F16) << 16)

    @triton.jit
    def _x_pairs(x_ptr, m, K, wi, w_ok, F16: tl.constexpr, X_DIRECT: tl.constexpr):
        """The four int32 x pairs of each word in wi ([BLOCK_W] each). X_DIRECT: x_ptr is x (already in the 16-bit
        compute type) viewed as int32; otherwise x is read as float32 and rounded to the compute type."""
        if X_DIRECT:
            base = x_ptr + m * (K // 2) + wi * 4
            x0 = tl.load(base, mask=w_ok, other=0)
            x1 = tl.load(base + 1, mask=w_ok, other=0)
            x2 = tl.load(base + 2, mask=w_ok, other=0)
            x3 = tl.load(base + 3, mask=w_ok, other=0)
        else:
            base = x_ptr + m * K + wi * 8
            x0 = _pack2(tl.load(base, mask=w_ok, other=0.0).to(tl.float32),
                        tl.load(base + 1, mask=w_ok, other=0.0).to(tl.float32), F16)
            x1 = _pack2(tl.load(base + 2, mask=w_ok, other=0.0).to(tl.float32),
                        tl.load(base + 3, mask=w_ok, other=0.0).to(tl.float32), F16)
            x2 = _pack2(tl.load(base + 4, mask=w_ok, other=0.0).to(tl.float32),
                        tl.load(base + 5, mask=w_ok, other=0.0).to(tl.float32), F16)
            x3 = _pack2(tl.load(base + 6, mask=w_ok, other=0.0).to(tl.float32),
                        tl.load(base + 7, mask=w_ok, other=0.0).to(tl.float32), F16)
        return x0, x1, x2, x3

    @triton.jit
    def _tables(regs_ptr, rows, words_per_row, zero, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """The eight table registers, [BLOCK_N, BLOCK_W] each. Loaded as scalars they would be uniform values, which
        the compiler keeps in uniform registers and copies into ordinary ones before every permute. `salt` is 0, but
        the compiler cannot prove it, nor that it is the same in every thread: derived from the rows (held once per
        row of a thread), or with one row per program (rows uniform) from the words too (once per word)."""
        if BLOCK_N == 1:
            salt = ((rows[:, None].to(tl.int64) * words_per_row + tl.arange(0, BLOCK_W)[None, :]) >> 62).to(tl.int32)
        else:
            salt = (rows[:, None].to(tl.int64) * words_per_row >> 62).to(tl.int32) + zero
        return (tl.load(regs_ptr) ^ salt, tl.load(regs_ptr + 1) ^ salt, tl.load(regs_ptr + 2) ^ salt,
                tl.load(regs_ptr + 3) ^ salt, tl.load(regs_ptr + 4) ^ salt, tl.load(regs_ptr + 5) ^ salt,
                tl.load(regs_ptr + 6) ^ salt, tl.load(regs_ptr + 7) ^ salt)

    @triton.jit
    def _row_words(rows, words_per_row, IDX32: tl.constexpr):
        """[BLOCK_N, 1] index of each row's first word."""
        if IDX32:
            rw = rows[:, None] * words_per_row
        else:  # (one return per function: triton wants one return type even across constexpr branches)
            rw = rows[:, None].to(tl.int64) * words_per_row
        return rw

    @triton.jit
    def _scale_index(row_words, wi, WPB: tl.constexpr, IDX32: tl.constexpr):
        """The absmax index of each word (unsigned with IDX32: the division is a shift)."""
        if IDX32:
            si = ((row_words + wi[None, :]).to(tl.uint32, bitcast=True) // WPB).to(tl.int32, bitcast=True)
        else:
            si = (row_words + wi[None, :]) // WPB
        return si

    @triton.jit
    def _first_words(w_ptr, row_words, row_ok, words_per_row, zero, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr,
                     EVEN: tl.constexpr):
        if PREFETCH:
            return _words(w_ptr, row_words, row_ok, 0, words_per_row, BLOCK_W, EVEN)
        return zero

    @triton.jit
    def _step(w_ptr, row_words, row_ok, w0, words_per_row, nxt, BLOCK_W: tl.constexpr, WPB: tl.constexpr,
              PREFETCH: tl.constexpr, EVEN: tl.constexpr, IDX32: tl.constexpr):
        """One step of the loop over a row's words: (this step's words, the next step's, their indices wi, wi in
        the row, each word's scale index). With PREFETCH the next step's words are loaded before this step's are
        decoded (twice the bytes in flight)."""
        if PREFETCH:
            word = nxt
            nxt = _words(w_ptr, row_words, row_ok, w0 + BLOCK_W, words_per_row, BLOCK_W, False)
        else:
            word = _words(w_ptr, row_words, row_ok, w0, words_per_row, BLOCK_W, EVEN)
        wi = w0 + tl.arange(0, BLOCK_W)
        return word, nxt, wi, wi < words_per_row, _scale_index(row_words, wi, WPB, IDX32)

    @triton.jit
    def _block_rows(pid_n, N, words_per_row, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, IDX32: tl.constexpr):
        """A program's weight rows: (rows, rows < N, their first words' indices, int32 zeros [BLOCK_N, BLOCK_W])."""
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_words = _row_words(rows, words_per_row, IDX32)
        zero = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
        return rows, rows < N, row_words, zero

    @triton.jit
    def _nf4_gemv_prmt_kernel(x_ptr, w_ptr, absmax_ptr, regs_ptr, y_ptr, M, N, K, words_per_row, n_scales,
                              BLOCKSIZE: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr,
                              F16: tl.constexpr, X_DIRECT: tl.constexpr, X_IN_ASM: tl.constexpr,
                              SCALE_IN_ASM: tl.constexpr, USE_ASM: tl.constexpr, EVEN: tl.constexpr,
                              IDX32: tl.constexpr, USE_PDL: tl.constexpr):
        # the word kernel's loop (int32 words, one scale per word, optional prefetch of the next step's words) with
        # the table lookups replaced by _word_dot's register decode; the products summed per lane across the loop
        # and reduced across the block once at the end. words_per_row (K // 8) is an argument of its own so that
        # Triton's specialization sees it divisible by 16 (every real K) and reads rows with 16-byte loads.
        # EVEN: words_per_row % BLOCK_W == 0 (no word past a row's end); IDX32: word indices fit in int32.
        # one program per (block of weight rows, row of x), the x rows of a block adjacent: they read the same
        # weights one after the other (from L2 after the first). With PREFETCH the first step's words are loaded
        # before pdl_wait (the packed weights are never written; x and the byte tables, which a CUDA graph may
        # compute in the step, are read after it).
        pid = tl.program_id(0)
        pid_n = pid // M
        m = pid % M
        WPB: tl.constexpr = BLOCKSIZE // 8
        rows, row_ok, row_words, zero = _block_rows(pid_n, N, words_per_row, BLOCK_N, BLOCK_W, IDX32)
        nxt = _first_words(w_ptr, row_words, row_ok, words_per_row, zero, BLOCK_W, PREFETCH, EVEN)
        pdl_wait(USE_PDL)
        l0, l1, l2, l3, h0, h1, h2, h3 = _tables(regs_ptr, rows, words_per_row, zero, BLOCK_N, BLOCK_W)
        xrow = x_ptr + m * (K // 2) + zero  # X_IN_ASM: x in the compute type as int32 pairs
        arow = absmax_ptr + zero  # SCALE_IN_ASM
        last_scale = n_scales - 1
        acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        for w0 in range(0, words_per_row, BLOCK_W):
            word, nxt, wi, w_ok, sidx = _step(w_ptr, row_words, row_ok, w0, words_per_row, nxt, BLOCK_W, WPB,
                                              PREFETCH, EVEN, IDX32)
            if SCALE_IN_ASM:  # indices clamped into the arrays; products of words past the ends are dropped
                if EVEN:
                    part = _word_dot_xs(word, wi[None, :] + zero, xrow, tl.minimum(sidx, last_scale).to(tl.int32), arow,
                                        l0, l1, l2, l3, h0, h1, h2, h3, F16, USE_ASM)
                else:
                    part = _word_dot_xs(word, tl.minimum(wi, words_per_row - 1)[None, :] + zero, xrow,
                                        tl.minimum(sidx, last_scale).to(tl.int32), arow, l0, l1, l2, l3, h0, h1,
                                        h2, h3, F16, USE_ASM)
                    part = tl.where(w_ok[None, :], part, 0.0)
                acc += part
            else:
                if X_IN_ASM:
                    if EVEN:
                        part = _word_dot_xa(word, wi[None, :] + zero, xrow, l0, l1, l2, l3, h0, h1, h2, h3, F16,
                                            USE_ASM)
                    else:  # words past the row's end read x at its last word (their products meet a zero scale)
                        part = _word_dot_xa(word, tl.minimum(wi, words_per_row - 1)[None, :] + zero, xrow, l0, l1,
                                            l2, l3, h0, h1, h2, h3, F16, USE_ASM)
                else:
                    x0, x1, x2, x3 = _x_pairs(x_ptr, m, K, wi, w_ok, F16, X_DIRECT)
                    part = _word_dot(word, x0[None, :] + zero, x1[None, :] + zero, x2[None, :] + zero,
                                     x3[None, :] + zero, l0, l1, l2, l3, h0, h1, h2, h3, F16, USE_ASM)
                if EVEN:
                    scale = tl.load(absmax_ptr + sidx, mask=row_ok[:, None], other=0.0)
                else:
                    scale = tl.load(absmax_ptr + sidx, mask=row_ok[:, None] & w_ok[None, :], other=0.0)
                acc += part * scale
        tl.store(y_ptr + m * N + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


    @triton.jit
    def _nf4_gemv_prmt_rows_kernel(x_ptr, w_ptr, absmax_ptr, regs_ptr, y_ptr, M, N, K, words_per_row, n_scales,
                                   BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                                   PREFETCH: tl.constexpr, F16: tl.constexpr, ROWS: tl.constexpr,
                                   USE_ASM: tl.constexpr, EVEN: tl.constexpr, IDX32: tl.constexpr,
                                   USE_PDL: tl.constexpr):
        # _nf4_gemv_prmt_kernel with x and the scale read in the asm, for ROWS (2 or 4) rows of x per program: each
        # word is read and decoded once for all of them. x (in the compute type, as int32 pairs) has a multiple of
        # ROWS rows (the launcher pads it); rows of y past M are not stored. PDL as in _nf4_gemv_prmt_kernel.
        pid = tl.program_id(0)
        groups = tl.cdiv(M, ROWS)
        pid_n = pid // groups
        m0 = (pid % groups) * ROWS
        WPB: tl.constexpr = BLOCKSIZE // 8
        rows, row_ok, row_words, zero = _block_rows(pid_n, N, words_per_row, BLOCK_N, BLOCK_W, IDX32)
        nxt = _first_words(w_ptr, row_words, row_ok, words_per_row, zero, BLOCK_W, PREFETCH, EVEN)
        pdl_wait(USE_PDL)
        l0, l1, l2, l3, h0, h1, h2, h3 = _tables(regs_ptr, rows, words_per_row, zero, BLOCK_N, BLOCK_W)
        xpairs = K // 2
        xrow = x_ptr + m0 * xpairs + zero
        xstride = (K * 2).to(tl.int64) + tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int64)
        arow = absmax_ptr + zero
        last_scale = n_scales - 1
        acc0 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        if ROWS == 4:
            acc2 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        for w0 in range(0, words_per_row, BLOCK_W):
            word, nxt, wi, w_ok, sidx = _step(w_ptr, row_words, row_ok, w0, words_per_row, nxt, BLOCK_W, WPB,
                                              PREFETCH, EVEN, IDX32)
            sidx = tl.minimum(sidx, last_scale).to(tl.int32)
            if EVEN:
                widx = wi[None, :] + zero
            else:
                widx = tl.minimum(wi, words_per_row - 1)[None, :] + zero
            if ROWS == 2:
                p0, p1 = _rows_dot2(word, widx, xrow, xstride, xpairs, sidx, arow, l0, l1, l2, l3, h0, h1, h2, h3,
                                    F16, USE_ASM)
                if EVEN:
                    acc0 += p0
                    acc1 += p1
                else:  # products of words past the row's end are dropped
                    acc0 += tl.where(w_ok[None, :], p0, 0.0)
                    acc1 += tl.where(w_ok[None, :], p1, 0.0)
            else:
                p0, p1, p2, p3 = _rows_dot4(word, widx, xrow, xstride, xpairs, sidx, arow, l0, l1, l2, l3, h0, h1,
                                            h2, h3, F16, USE_ASM)
                if EVEN:
                    acc0 += p0
                    acc1 += p1
                    acc2 += p2
                    acc3 += p3
                else:
                    acc0 += tl.where(w_ok[None, :], p0, 0.0)
                    acc1 += tl.where(w_ok[None, :], p1, 0.0)
                    acc2 += tl.where(w_ok[None, :], p2, 0.0)
                    acc3 += tl.where(w_ok[None, :], p3, 0.0)
        out = y_ptr + m0 * N + rows
        mrow = m0 + rows * 0  # the x row, as a tensor like rows
        tl.store(out, tl.sum(acc0, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)
        tl.store(out + N, tl.sum(acc1, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok & (mrow + 1 < M))
        if ROWS == 4:
            tl.store(out + 2 * N, tl.sum(acc2, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok & (mrow + 2 < M))
            tl.store(out + 3 * N, tl.sum(acc3, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok & (mrow + 3 < M))


def launch_prmt(x, packed, absmax, code, y, n, k, blocksize, bn, bk, warps, prefetch, variant, use_asm: bool):
    """Launch variant `variant` (a key of PRMT_VARIANTS) of the prmt kernel: y [M, N] = x [M, K] @ W^T."""
    _, f16, x_in_asm, scale_in_asm = PRMT_VARIANTS[variant]
    half = torch.float16 if f16 else torch.bfloat16
    if x_in_asm and (x.dtype != half or x.data_ptr() % 16):  # the asm reads x as 16-byte vectors of that type
        x = x.to(half, copy=True)
    direct = x.dtype == half
    xin = x.view(torch.int32) if direct else x
    regs = code_regs(code, f16)
    wpr = k // 8
    m = x.shape[0]
    pdl = pdl_mode(packed.device)
    even, idx32 = wpr % (bk // 8) == 0, (triton.cdiv(n, bn) * bn + 1) * wpr < 2 ** 31
    if ROWS_KERNEL and scale_in_asm and m >= 2:
        rows = 2 if m == 2 else 4
        if m % rows:  # whole groups of rows: zero rows past M (never stored)
            x = torch.cat([x, x.new_zeros(rows - m % rows, k)])
        _nf4_gemv_prmt_rows_kernel[(triton.cdiv(n, bn) * triton.cdiv(m, rows),)](
            x.view(torch.int32), packed.view(torch.int32), absmax, regs, y, m, n, k, wpr, absmax.numel(),
            BLOCKSIZE=blocksize, BLOCK_N=bn, BLOCK_W=bk // 8, PREFETCH=bool(prefetch), F16=f16, ROWS=rows,
            USE_ASM=use_asm, EVEN=even, IDX32=idx32, USE_PDL=pdl, num_warps=warps, **pdl_launch(pdl))
        return
    _nf4_gemv_prmt_kernel[(triton.cdiv(n, bn) * m,)](
        xin, packed.view(torch.int32), absmax, regs, y, m, n, k, wpr, absmax.numel(), BLOCKSIZE=blocksize, BLOCK_N=bn,
        BLOCK_W=bk // 8, PREFETCH=bool(prefetch), F16=f16, X_DIRECT=direct, X_IN_ASM=x_in_asm,
        SCALE_IN_ASM=scale_in_asm, USE_ASM=use_asm, EVEN=even, IDX32=idx32, USE_PDL=pdl, num_warps=warps,
        **pdl_launch(pdl))
