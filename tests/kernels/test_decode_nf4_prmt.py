"""The register-decode (prmt) NF4 GEMV variants: their PTX text, run through a simulator of the PTX instructions it
uses (prmt per the PTX ISA, sign-replicate mode included), decodes every code at every position of a word exactly and
sums with bf16/fp16 accuracy; the kernels (pure-Triton twin of the asm under the interpreter) equal the dequantize-
then-matmul reference; the tuner never picks a variant whose output is wrong or that fails."""
import importlib
import os
import re

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _modules():
    """decode_nf4 (and its prmt module) with the kernels under the interpreter on CPU."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastlm.kernels import decode_nf4, decode_nf4_prmt

    if not torch.cuda.is_available() and not isinstance(decode_nf4_prmt._nf4_gemv_prmt_kernel, InterpretedFunction):
        decode_nf4_prmt = importlib.reload(decode_nf4_prmt)
        decode_nf4 = importlib.reload(decode_nf4)
    return decode_nf4, decode_nf4_prmt


# ---- a simulator of the PTX instructions the asm uses (numpy, vectorized over words) ----------------------------

def _prmt(a, b, c):
    """prmt.b32 d, a, b, c, generic form (PTX ISA): d.byte[i] = byte (c >> 4i) & 7 of {b, a}, or, when bit 3 of
    that selector nibble is set, the selected byte's sign bit replicated over the byte."""
    tmp = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    d = np.zeros_like(a, dtype=np.uint32)
    for i in range(4):
        ctl = (c >> np.uint32(4 * i)) & np.uint32(15)
        byte = ((tmp >> ((ctl & np.uint32(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(255)).astype(np.uint32)
        sign = np.where(byte & np.uint32(128), np.uint32(255), np.uint32(0)).astype(np.uint32)
        byte = np.where(ctl & np.uint32(8), sign, byte).astype(np.uint32)
        d |= byte << np.uint32(8 * i)
    return d


def _bf16_bits(v64):
    """float64 -> bf16 bits, round to nearest even (through torch, which rounds float32 -> bf16 that way)."""
    t = torch.from_numpy(np.asarray(v64, dtype=np.float64)).to(torch.float32).to(torch.bfloat16)
    return t.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)


def _half_to_f64(bits, f16):
    bits = bits.astype(np.uint32) & np.uint32(0xFFFF)
    if f16:
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    return (bits << np.uint32(16)).view(np.float32).astype(np.float64)


def _fma_x2(a, b, c, f16):
    out = np.zeros_like(a)
    for sh in (0, 16):
        r = (_half_to_f64(a >> np.uint32(sh), f16) * _half_to_f64(b >> np.uint32(sh), f16)
             + _half_to_f64(c >> np.uint32(sh), f16))
        bits = r.astype(np.float16).view(np.uint16).astype(np.uint32) if f16 else _bf16_bits(r)
        out |= bits << np.uint32(sh)
    return out


SCALES_AT = 1 << 40  # the simulated address of the absmax array (x's row is at 0)


def run_ptx(ptx: str, operands: dict, memory=None, scales=None, outputs: int = 1):
    """Run the asm text on numpy uint32 operand arrays {n: array} for $n (n >= outputs); returns $0 (or the list
    $0..$outputs-1) as float32. ld.global reads `memory` (uint32 array, at address 0) or `scales` (float32 array, at
    SCALES_AT); addresses in bytes."""
    reg = {f"${n}": v for n, v in operands.items()}

    def val(tok):
        tok = tok.strip()
        if tok in reg:
            return reg[tok]
        return np.uint32(int(tok, 0))

    f16 = "fma.rn.f16x2" in ptx
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if op == "ld.global.nc.v4.b32":
            dst, addr = re.match(r"\{(.*)\},\s*\[(\w+)\]", rest).groups()
            idx = (reg[addr] // 4).astype(np.int64)
            for j, name in enumerate(d.strip() for d in dst.split(",")):
                reg[name] = memory[idx + j].astype(np.uint32)
            continue
        if op == "ld.global.nc.b32":
            dst, addr = re.match(r"(\w+),\s*\[(\w+)\]", rest).groups()
            assert (reg[addr] >= SCALES_AT).all()
            reg[dst] = np.asarray(scales, np.float32)[((reg[addr] - SCALES_AT) // 4).astype(np.int64)].view(np.uint32)
            continue
        if op == "mov.b32" and rest.startswith("{"):
            dst, src = re.match(r"\{(.*)\},\s*(\S+)", rest).groups()
            h0, h1 = (d.strip() for d in dst.split(","))
            reg[h0], reg[h1] = val(src) & np.uint32(0xFFFF), val(src) >> np.uint32(16)
            continue
        args = [a.strip() for a in rest.split(",")]
        d, src = args[0], args[1:]
        v = [val(a) for a in src]
        if op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "shr.u32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = (v[0].astype(np.uint64) << np.uint64(int(v[1]))).astype(np.uint32)
        elif op == "mov.b32":
            r = np.uint32(v[0])
        elif op == "prmt.b32":
            shape = np.broadcast(*[np.asarray(x) for x in v]).shape
            r = _prmt(*[np.broadcast_to(np.asarray(x, dtype=np.uint32), shape) for x in v])
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            shape = np.broadcast(*[np.asarray(x) for x in v]).shape
            r = _fma_x2(*[np.broadcast_to(np.asarray(x, dtype=np.uint32), shape).copy() for x in v], f16=f16)
        elif op == "cvt.f32.f16":
            r = _half_to_f64(v[0], True).astype(np.float32).view(np.uint32)
        elif op == "add.f32":
            r = (np.asarray(v[0], np.uint32).view(np.float32) + np.asarray(v[1], np.uint32).view(np.float32)
                 ).view(np.uint32)
        elif op == "mul.f32":
            r = (np.asarray(v[0], np.uint32).view(np.float32) * np.asarray(v[1], np.uint32).view(np.float32)
                 ).view(np.uint32)
        elif op == "add.s64":
            r = np.asarray(v[0], np.uint64) + np.asarray(v[1], np.uint64)
        elif op == "mad.wide.u32":
            r = v[0].astype(np.uint64) * np.uint64(int(v[1])) + np.asarray(v[2], np.uint64)
        else:
            raise AssertionError(f"instruction {op!r} not simulated")
        reg[d] = r
    outs = [np.asarray(reg[f"${i}"], np.uint32).view(np.float32) for i in range(outputs)]
    return outs[0] if outputs == 1 else outs


def _pack_words(codes):
    """[W, 8] codes -> [W] uint32 words in bitsandbytes' layout: byte b = (code 2b << 4) | code 2b+1, bytes of a
    word little-endian."""
    codes = np.asarray(codes, dtype=np.uint32)
    byts = (codes[:, 0::2] << np.uint32(4)) | codes[:, 1::2]
    return (byts[:, 0] | byts[:, 1] << np.uint32(8) | byts[:, 2] << np.uint32(16) | byts[:, 3] << np.uint32(24))


def _x_pairs(xbits):
    """[W, 8] 16-bit patterns -> [W, 4] uint32 pairs (element 2j in the low half, as in memory)."""
    xbits = np.asarray(xbits, dtype=np.uint32)
    return xbits[:, 0::2] | (xbits[:, 1::2] << np.uint32(16))


def _operands(ptx_x_in_asm, words, pairs, regs, scale_idx=None):
    """Operands of the PTX: with ptx_x_in_asm the word indices and x's address (0), and with scale_idx (the words'
    scale indices) the scales' address; otherwise the x pairs; then the table registers."""
    regs = regs.numpy().astype(np.int64).astype(np.uint32)
    n = len(words)
    ops = {1: words}
    if ptx_x_in_asm:  # $2 word index, $3 x's base address (0): the asm loads pairs from memory
        ops[2] = np.arange(n, dtype=np.uint32)
        ops[3] = np.uint64(0)
        first = 4
        if scale_idx is not None:
            ops[4] = np.asarray(scale_idx, dtype=np.uint32)
            ops[5] = np.uint64(SCALES_AT)
            first = 6
    else:
        for j in range(4):
            ops[2 + j] = pairs[:, j]
        first = 6
    for i in range(8):
        ops[first + i] = np.full(n, regs[i], dtype=np.uint32)
    return ops


@pytest.mark.parametrize("f16, x_in_asm, scale_in_asm", [(False, True, True), (True, True, True),
                                                          (False, False, False), (False, True, False)])
@pytest.mark.parametrize("table", ["nf4", "sorted", "unsorted"])
def test_ptx_decodes_every_code_at_every_position(f16, x_in_asm, scale_in_asm, table):
    _, prmt = _modules()
    rng = np.random.default_rng(0)
    code = {"nf4": torch.tensor(NF4), "sorted": torch.tensor(np.sort(rng.normal(size=16)), dtype=torch.float32),
            "unsorted": torch.tensor(rng.normal(size=16) * 3, dtype=torch.float32)}[table]
    regs = prmt.code_regs_uncached(code, f16)
    half = torch.float16 if f16 else torch.bfloat16
    expect = code.to(half).float().numpy()  # the table as the variant holds it
    one = int(torch.tensor(1.0).to(half).view(torch.int16)) & 0xFFFF
    # every (position j, code c), the other seven codes random; x one-hot at weight j: the output is weight j's value
    pos, cs = np.meshgrid(np.arange(8), np.arange(16), indexing="ij")
    pos, cs = np.repeat(pos.ravel(), 4), np.repeat(cs.ravel(), 4)
    codes = rng.integers(0, 16, size=(len(pos), 8))
    codes[np.arange(len(pos)), pos] = cs
    xbits = np.zeros((len(pos), 8), dtype=np.uint32)
    xbits[np.arange(len(pos)), pos] = one
    pairs = _x_pairs(xbits)
    ptx = prmt.word_dot_ptx(f16, x_in_asm, scale_in_asm)
    # with the scale in the asm: word i's scale is scales[i // 3] (a power of two: the product stays exact)
    scales = 2.0 ** rng.integers(-3, 4, size=len(pos) // 3 + 1)
    sidx = np.arange(len(pos)) // 3 if scale_in_asm else None
    got = run_ptx(ptx, _operands(x_in_asm, _pack_words(codes), pairs, regs, sidx), memory=pairs.reshape(-1),
                  scales=scales)
    want = expect[cs] * (scales[sidx] if scale_in_asm else 1.0)
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("rows", [2, 4])
def test_rows_ptx_decodes_once_for_every_row(f16, rows):
    """The multi-row PTX: row r's x is one-hot at position (j + r) % 8, so output r is the value of the code there,
    times the word's scale: every row reads its own x (rows `stride` bytes apart) against the shared decode."""
    _, prmt = _modules()
    rng = np.random.default_rng(2)
    code = torch.tensor(NF4)
    regs = prmt.code_regs_uncached(code, f16).numpy().astype(np.int64).astype(np.uint32)
    half = torch.float16 if f16 else torch.bfloat16
    one = int(torch.tensor(1.0).to(half).view(torch.int16)) & 0xFFFF
    n = 64
    codes = rng.integers(0, 16, size=(n, 8))
    pos = rng.integers(0, 8, size=n)
    mem = []
    for r in range(rows):  # x row r: n words of 4 pairs
        xbits = np.zeros((n, 8), dtype=np.uint32)
        xbits[np.arange(n), (pos + r) % 8] = one
        mem.append(_x_pairs(xbits).reshape(-1))
    memory = np.concatenate(mem)
    scales = 2.0 ** rng.integers(-3, 4, size=n // 4)
    ops = {rows: _pack_words(codes), rows + 1: np.arange(n, dtype=np.uint32), rows + 2: np.uint64(0),
           rows + 3: np.uint64(n * 16), rows + 4: (np.arange(n) // 4).astype(np.uint32), rows + 5: np.uint64(SCALES_AT)}
    for i in range(8):
        ops[rows + 6 + i] = np.full(n, regs[i], dtype=np.uint32)
    outs = run_ptx(prmt.rows_dot_ptx(f16, rows), ops, memory=memory, scales=scales, outputs=rows)
    values = code.to(half).float().numpy()
    for r in range(rows):
        want = values[codes[np.arange(n), (pos + r) % 8]] * scales[np.arange(n) // 4]
        np.testing.assert_array_equal(outs[r], want.astype(np.float32))


def test_ptx_selectors_never_use_sign_replicate_mode_where_it_would_corrupt():
    """The simulator's prmt honours bit 3 (sign replicate): a table byte with its sign bit set read through a
    selector nibble >= 8 comes back as 0xFF, not the byte. The asm masks codes to 3 bits before every table permute;
    without the mask the codes 8-15 would decode wrongly (this checks the simulator can tell)."""
    _, prmt = _modules()
    a, b = np.array([0x80402010], dtype=np.uint32), np.array([0x08040201], dtype=np.uint32)
    assert _prmt(a, b, np.array([0x3210], dtype=np.uint32))[0] == 0x80402010
    assert _prmt(a, b, np.array([0xB210], dtype=np.uint32))[0] == 0xFF402010  # nibble 3 = 8|3: sign of 0x80
    # nibbles (low first) 4: byte 4 = 0x01; 8: sign of byte 0 (0x10) = 0x00; C: sign of byte 4 (0x01) = 0x00;
    # 0: byte 0 = 0x10
    assert _prmt(a, b, np.array([0x0C84], dtype=np.uint32))[0] == 0x10000001
    ptx = prmt.word_dot_ptx(False, True)
    unmasked = ptx.replace("and.b32 rq, $1, 0x77777777;", "mov.b32 rq, $1;")
    code = torch.tensor(NF4)
    regs = prmt.code_regs_uncached(code, False)
    codes = np.tile(np.arange(8, 16), (8, 1))
    xbits = np.eye(8, dtype=np.uint32) * (int(torch.tensor(1.0).to(torch.bfloat16).view(torch.int16)) & 0xFFFF)
    pairs = _x_pairs(xbits)
    ops = _operands(True, _pack_words(codes), pairs, regs)
    good = run_ptx(ptx, ops, memory=pairs.reshape(-1))
    bad = run_ptx(unmasked, ops, memory=pairs.reshape(-1))
    np.testing.assert_array_equal(good, code.to(torch.bfloat16).float().numpy()[8:16])
    assert not np.array_equal(bad, good)


@pytest.mark.parametrize("f16, bound", [(False, 6e-3), (True, 1e-3)])
def test_ptx_sum_accuracy_at_k_14336(f16, bound):
    """One row of K = 14336 (the 8B down projection) with the NF4 table: the table rounded to bf16/fp16, the
    words' 16-bit products and partial sums, float32 accumulation: within a few bf16 (fp16) roundings of the exact
    float64 dot product, relative to the size of its terms (measured 1e-4..4.4e-3 for bf16 over 4 seeds, 1e-4..5e-4
    for fp16; a bf16 output rounding alone is up to 3.9e-3)."""
    _, prmt = _modules()
    rng = np.random.default_rng(1)
    k = 14336
    words_n = k // 8
    half = torch.float16 if f16 else torch.bfloat16
    code = torch.tensor(NF4)
    codes = rng.integers(0, 16, size=(words_n, 8))
    x = torch.randn(k, generator=torch.Generator().manual_seed(1)).to(half)
    xbits = x.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32).reshape(words_n, 8)
    absmax = rng.uniform(0.01, 0.1, size=k // 64)
    pairs = _x_pairs(xbits)
    part = run_ptx(prmt.word_dot_ptx(f16, True, True), _operands(True, _pack_words(codes), pairs,
                                                                   prmt.code_regs_uncached(code, f16),
                                                                   np.arange(words_n) // 8),
                   memory=pairs.reshape(-1), scales=absmax.astype(np.float32))
    got = float(part.astype(np.float32).sum(dtype=np.float32))
    w = np.asarray(NF4)[codes.reshape(-1)] * absmax.repeat(64)
    exact = float(w @ x.double().numpy())
    scale = float(np.sqrt(((w * x.double().numpy()) ** 2).sum()))  # the size of the terms: cancellation-proof
    assert abs(got - exact) / scale < bound


def test_code_regs_hold_the_table_bytes_and_reject_other_sizes():
    _, prmt = _modules()
    code = torch.tensor(NF4)
    regs = prmt.code_regs_uncached(code, False).numpy().astype(np.int64) & 0xFFFFFFFF
    bits = code.to(torch.bfloat16).view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    for e in range(16):
        assert (regs[e // 4] >> (8 * (e % 4))) & 255 == bits[e] & 255
        assert (regs[4 + e // 4] >> (8 * (e % 4))) & 255 == bits[e] >> 8
    assert prmt.code_regs(code, False) is prmt.code_regs(code, False)  # remembered per tensor
    with pytest.raises(ValueError, match="16-entry code table"):
        prmt.code_regs_uncached(torch.zeros(8), False)


# ---- the kernels under the interpreter (the asm's pure-Triton twin) -------------------------------------------

def _case(n, k, m, table, dtype, seed=0):
    torch.manual_seed(seed)
    if table == "bnb":
        bnb = pytest.importorskip("bitsandbytes.functional")
        from fastlm.kernels.decode_nf4 import nf4_absmax_fp32

        packed, state = bnb.quantize_4bit(torch.randn(n, k), blocksize=64, compress_statistics=True,
                                          quant_type="nf4")
        absmax, code = nf4_absmax_fp32(state), state.code.float()
    else:
        packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8)
        absmax = torch.rand(n * k // 64) + 0.05
        code = torch.tensor(sorted((torch.randn(16) * 2).tolist()))
    return torch.randn(m, k).to(dtype), packed, absmax, code


@pytest.mark.parametrize("n, k, m, table, dtype, cfg", [
    (17, 1600, 2, "bnb", torch.float32, (8, 2048, 2, 1)),     # N % BLOCK_N, K < BLOCK_K (a tail), rows 2
    (20, 192, 3, "sorted", torch.bfloat16, (8, 128, 2, 0)),   # K tail past a step (192 = 128 + 64), rows 3
    (9, 256, 4, "bnb", torch.float16, (8, 256, 4, 1)),        # whole steps, N < BLOCK_N, rows 4
    (5, 512, 1, "sorted", torch.bfloat16, (1, 256, 1, 1)),    # one row per program, two whole steps, rows 1
])
@pytest.mark.parametrize("variant", [1, 2, 3, 4])
def test_prmt_variants_match_reference(n, k, m, table, dtype, cfg, variant):
    d, _ = _modules()
    x, packed, absmax, code = _case(n, k, m, table, dtype)
    ref = d.nf4_gemv_reference(x.float(), packed, absmax, code, n, k, 64)
    got = d.nf4_gemv(x, packed, absmax, code, n, k, 64, config=(*cfg, variant))
    assert got.dtype == x.dtype and got.shape == (m, n)
    # the table in 16 bits: bf16 (8-bit mantissa) or fp16 (11); plus x.dtype's rounding of the output
    f16 = variant == 2
    tol = 6e-3 if not f16 or dtype == torch.bfloat16 else 1e-3
    assert d.relative_error(got, ref) < tol, (variant, d.relative_error(got, ref))
    word = d.nf4_gemv(x, packed, absmax, code, n, k, 64, config=(*cfg, 0))
    assert d.relative_error(word, ref) < 4e-3  # the word kernel, for scale


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("variant", [1, 2])
def test_rows_kernel_and_one_row_programs_agree(m, variant, monkeypatch):
    """2-5 rows of x: the multi-row kernel (groups of 2 or 4 rows, padded) and one program per row both equal the
    reference."""
    d, prmt = _modules()
    x, packed, absmax, code = _case(12, 320, m, "sorted", torch.float32, seed=m)
    ref = d.nf4_gemv_reference(x, packed, absmax, code, 12, 320, 64)
    got = d.nf4_gemv(x, packed, absmax, code, 12, 320, 64, config=(8, 256, 2, 1, variant))
    monkeypatch.setattr(prmt, "ROWS_KERNEL", False)
    per_row = d.nf4_gemv(x, packed, absmax, code, 12, 320, 64, config=(8, 256, 2, 1, variant))
    tol = 6e-3 if variant == 1 else 1e-3
    assert d.relative_error(got, ref) < tol and d.relative_error(per_row, ref) < tol
    torch.testing.assert_close(got, per_row, rtol=1e-5, atol=1e-5)  # the twin sums exactly: same numbers


def test_config_checks_and_old_four_field_configs():
    d, _ = _modules()
    x, packed, absmax, code = _case(8, 64, 1, "sorted", torch.float32)
    ref = d.nf4_gemv_reference(x, packed, absmax, code, 8, 64, 64)
    torch.testing.assert_close(d.nf4_gemv(x, packed, absmax, code, 8, 64, 64, config=(2, 512, 2, 0)), ref,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="VARIANT one of"):
        d.nf4_gemv(x, packed, absmax, code, 8, 64, 64, config=(2, 512, 2, 0, 9))
    assert d.nf4_gemv_config(8, 64, 64, "cpu") == d.INTERPRETER_CONFIG
    assert {c[4] for c in d._CONFIGS + d.SWEEP_ONLY_CONFIGS} == set(d.VARIANTS)
    assert {c[4] for c in d.tune_candidates(torch.bfloat16)} == {0, 1}
    assert {c[4] for c in d.tune_candidates(torch.float16)} == {0, 2}
    assert {c[4] for c in d.tune_candidates(torch.float32)} == {0}


def test_tuner_skips_wrong_and_failing_variants(monkeypatch):
    """The tuner checks each candidate's output against the reference before timing it: a variant made wrong (its
    register table corrupted) or failing is never picked, however fast it claims to be."""
    d, prmt = _modules()
    n, k = 12, 128
    inputs = d.tune_inputs(n, k, 64, "cpu", rows=1, dtype=torch.float32)
    cands = [(8, 128, 2, 0, 0), (8, 128, 2, 0, 1), (8, 128, 2, 0, 3)]  # word, prmt-bf16, prmt-bf16-tlx

    def time_ms(fn):  # variant 1 claims to be the fastest, then 3, then the word kernel
        fn()
        return {0: 3.0, 1: 1.0, 3: 2.0}[current["cfg"][4]]

    current = {}
    real_launch = d._launch

    def launch(x, packed, absmax, code, y, n_, k_, bs, cfg):
        current["cfg"] = tuple(cfg)
        return real_launch(x, packed, absmax, code, y, n_, k_, bs, cfg)

    monkeypatch.setattr(d, "_launch", launch)
    best, skipped = d._tune(n, k, 64, inputs, cands, time_ms)
    assert best == (8, 128, 2, 0, 1) and skipped == []  # all correct: the fastest wins

    real_regs = prmt.code_regs_uncached

    def bad_regs(code, f16):
        regs = real_regs(code, f16).clone()
        regs[[0, 2]] = regs[[2, 0]]  # low bytes of entries 0-3 and 8-11 swapped
        return regs

    monkeypatch.setattr(prmt, "code_regs", bad_regs)
    best, skipped = d._tune(n, k, 64, inputs, cands, time_ms)
    assert best == (8, 128, 2, 0, 0)
    assert [c[4] for c, why in skipped] == [1, 3] and all(why.startswith("wrong") for _, why in skipped)

    def boom(*a, **kw):
        raise RuntimeError("ptxas: fake compile failure")

    monkeypatch.setattr(prmt, "_nf4_gemv_prmt_kernel", type("K", (), {"__getitem__": lambda self, g: boom})())
    best, skipped = d._tune(n, k, 64, inputs, cands, time_ms)
    assert best == (8, 128, 2, 0, 0)
    assert all("fake compile failure" in why for _, why in skipped) and len(skipped) == 2
