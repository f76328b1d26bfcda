"""The split-K NF4 GEMV (pure-Triton twin of the byte-permute asm under the interpreter): its partial sums add up to
the dequantize-then-matmul reference for bitsandbytes-quantized and random bytes, tails in N and K included; its
config is checked; the engine's projection hands the partial sums to the decode epilogues."""
import importlib
import re
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")


def _modules():
    from triton.runtime.interpreter import InterpretedFunction

    from fastlm.kernels import decode_nf4, decode_nf4_prmt, decode_nf4_splitk

    if not torch.cuda.is_available() and not isinstance(decode_nf4_splitk._nf4_partials_kernel,
                                                        InterpretedFunction):
        importlib.reload(decode_nf4_prmt)
        decode_nf4 = importlib.reload(decode_nf4)
        decode_nf4_splitk = importlib.reload(decode_nf4_splitk)
    return decode_nf4, decode_nf4_splitk


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
    (17, 512, 1, "bnb", torch.bfloat16, (8, 128, 1)),      # N % BLOCK_N, 4 whole splits
    (12, 320, 2, "sorted", torch.float16, (4, 128, 2)),    # K tail: the third split is half past the row's end
    (5, 192, 1, "sorted", torch.float32, (8, 256, 1)),     # N < BLOCK_N, one split wider than K; fp32 x -> bf16
    (9, 256, 3, "bnb", torch.bfloat16, (2, 64, 1)),        # 3 rows of x, 4 splits
])
def test_partials_add_up_to_the_reference(n, k, m, table, dtype, cfg):
    d, s = _modules()
    x, packed, absmax, code = _case(n, k, m, table, dtype)
    ref = d.nf4_gemv_reference(x.float(), packed, absmax, code, n, k, 64)
    got = s.nf4_partials(x, packed, absmax, code, n, k, 64, cfg)
    assert got.dtype == torch.float32 and got.shape == (-(-k // cfg[1]), m, n)
    # 16-bit table values and products (bf16: 8-bit mantissa, fp16: 11), float32 across words; plus x's rounding
    tol = 1e-3 if dtype == torch.float16 else 6e-3
    assert d.relative_error(got.sum(0), ref) < tol
    # each split is the product over its own columns only
    c1 = min(k, cfg[1])
    part = d.nf4_gemv_reference(x.float()[:, :c1], *_columns(packed, absmax, n, k, c1), code, n, c1, 64)
    assert d.relative_error(got[0], part) < tol


def _columns(packed, absmax, n, k, c1):
    """The packed bytes and scales of columns [0, c1) of every row (c1 a multiple of the blocksize 64)."""
    rows = packed.view(n, k // 2)[:, :c1 // 2].reshape(-1)
    return rows, absmax.view(n, k // 64)[:, :c1 // 64].reshape(-1)


def test_config_is_checked_and_interpreter_config_respects_max_splits():
    _, s = _modules()
    x, packed, absmax, code = _case(8, 128, 1, "sorted", torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_N, BLOCK_K, num_warps"):
        s.nf4_partials(x, packed, absmax, code, 8, 128, 64, (8, 100, 1))
    with pytest.raises(ValueError, match="nf4_partials_config"):
        s.nf4_partials(x, packed, absmax, code, 8, 128, 64, (8, 128))
    assert s.nf4_partials_config(8, 128, 64, packed, code) == s.INTERPRETER_CONFIG
    # 4096 columns in splits of 32 would be 128 partial sums: more than the consumer adds
    assert s.nf4_partials_config(8, 4096, 64, packed, code, max_splits=16) is None
    assert s.nf4_partials_config(8, 128, 64, packed, torch.zeros(8)) is None  # not a 16-entry table
    assert s.nf4_partials_config(8, 128, 64, packed, code, dtype=torch.float32) is None


# ---- the quad asm's PTX text through a simulator of its instructions (the prmt tests' simulator, extended) ------

def _prmt_tests():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("test_decode_nf4_prmt.py")
    spec = importlib.util.spec_from_file_location("_nf4_prmt_sim", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_quad_ptx(ptx, words, xmem, scales, sidx, regs, sim):
    """Run the quad asm on numpy operands: words [Q, 4] uint32, x pairs in xmem (uint32, quad q's at 16 q), the
    float32 scales with quad q's at sidx[q], regs the 8 table registers. Returns [Q] float32."""
    import numpy as np

    q = len(words)
    reg = {f"${1 + j}": words[:, j] for j in range(4)}
    reg["$5"] = np.arange(q, dtype=np.uint64) * np.uint64(64)  # byte address of quad q's x pairs
    reg["$6"] = np.asarray(sidx, np.uint64) * np.uint64(4)       # byte address of its scale
    reg["$7"] = np.full(q, 0x32103210, np.uint32)
    for i in range(8):
        reg[f"${8 + i}"] = np.full(q, regs[i], np.uint32)
    f16 = "fma.rn.f16x2" in ptx

    def val(tok):
        tok = tok.strip()
        return reg[tok] if tok in reg else np.uint32(int(tok, 0))

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if op.startswith("ld.global.nc"):
            dst, base, off = re.match(r"\{?([^}\[]*?)\}?,\s*\[(\$\d+)(?:\+(\d+))?\]", rest).groups()
            addr = (reg[base] + np.uint64(int(off or 0))) // np.uint64(4)
            names = [d.strip() for d in dst.split(",")]
            for j, name in enumerate(names):
                if op.endswith("v4.b32"):
                    reg[name] = xmem[(addr + np.uint64(j)).astype(np.int64)].astype(np.uint32)
                else:
                    reg[name] = np.asarray(scales, np.float32)[addr.astype(np.int64)].view(np.uint32)
            continue
        if op == "mov.b32" and rest.startswith("{"):
            dst, src = re.match(r"\{(.*)\},\s*(\S+)", rest).groups()
            h0, h1 = (d.strip() for d in dst.split(","))
            reg[h0], reg[h1] = val(src) & np.uint32(0xFFFF), val(src) >> np.uint32(16)
            continue
        args = [a.strip() for a in rest.split(",")]
        d, v = args[0], [val(a) for a in args[1:]]
        u = [np.broadcast_to(np.asarray(x, dtype=np.uint32), (q,)).copy() for x in v]
        if op == "and.b32":
            r = u[0] & u[1]
        elif op == "mov.b32":
            r = u[0]
        elif op == "mul.hi.u32":
            r = ((u[0].astype(np.uint64) * u[1].astype(np.uint64)) >> np.uint64(32)).astype(np.uint32)
        elif op == "mul.lo.u32":
            r = ((u[0].astype(np.uint64) * u[1].astype(np.uint64)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        elif op == "lop3.b32":  # bitwise function given by its truth table over a=0xF0, b=0xCC, c=0xAA
            lut = int(args[4], 0)
            r = np.zeros(q, np.uint32)
            for bits in range(8):
                if lut >> bits & 1:
                    a_, b_, c_ = bits >> 2 & 1, bits >> 1 & 1, bits & 1
                    r |= ((u[0] if a_ else ~u[0]) & (u[1] if b_ else ~u[1]) & (u[2] if c_ else ~u[2]))
        elif op == "prmt.b32":
            r = sim._prmt(u[0], u[1], u[2])
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            r = sim._fma_x2(u[0], u[1], u[2], f16=f16)
        elif op == "cvt.f32.f16":
            r = sim._half_to_f64(u[0], True).astype(np.float32).view(np.uint32)
        elif op in ("add.f32", "mul.f32"):
            a_, b_ = u[0].view(np.float32), u[1].view(np.float32)
            r = (a_ + b_ if op == "add.f32" else a_ * b_).astype(np.float32).view(np.uint32)
        else:
            raise AssertionError(f"instruction {op!r} not simulated")
        reg[d] = r
    return np.asarray(reg["$0"], np.uint32).view(np.float32)


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("lop3", [True, False])
@pytest.mark.parametrize("table", ["nf4", "unsorted"])
def test_quad_ptx_decodes_every_code_at_every_position(f16, lop3, table):
    """Every code at every one of a quad's 32 positions, one weight non-zero at a time (x = 1 there): the asm gives
    exactly the table value (in 16 bits) times the scale; then random quads against float64 sums."""
    import numpy as np

    _, s = _modules()
    sim = _prmt_tests()
    from fastlm.kernels.decode_nf4_prmt import code_regs_uncached

    rng = np.random.default_rng(0)
    code = torch.tensor(sim.NF4) if table == "nf4" else torch.tensor(rng.standard_normal(16), dtype=torch.float32)
    regs = code_regs_uncached(code, f16).numpy().astype(np.int64).astype(np.uint32)
    half = torch.float16 if f16 else torch.bfloat16
    one = int(torch.tensor(1.0, dtype=half).view(torch.int16)) & 0xFFFF
    ptx = s.quad_dot_ptx(f16, lop3)
    # case (c, p): code c at position p of the quad, every other weight code 0 with x 0 there
    cases = [(c, p) for c in range(16) for p in range(32)]
    codes = np.zeros((len(cases), 32), np.uint32)
    xbits = np.zeros((len(cases), 32), np.uint32)
    for i, (c, p) in enumerate(cases):
        codes[i, p], xbits[i, p] = c, one
    words = sim._pack_words(codes.reshape(-1, 8)).reshape(-1, 4)
    xmem = sim._x_pairs(xbits.reshape(-1, 8)).reshape(-1)
    got = _run_quad_ptx(ptx, words, xmem, np.full(len(cases), 2.0, np.float32), np.arange(len(cases)), regs, sim)
    want = code.to(half).float().numpy()[[c for c, _ in cases]] * 2.0
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # random quads: within 16-bit rounding of the float64 dot
    n = 256
    codes = rng.integers(0, 16, (n, 32)).astype(np.uint32)
    xv = torch.randn(n, 32).to(half)
    xmem = sim._x_pairs((xv.view(torch.int16).numpy().astype(np.int64) & 0xFFFF).astype(np.uint32)
                        .reshape(-1, 8)).reshape(-1)
    scales = rng.random(n).astype(np.float32) + 0.5
    got = _run_quad_ptx(ptx, sim._pack_words(codes.reshape(-1, 8)).reshape(-1, 4), xmem, scales, np.arange(n),
                        regs, sim)
    vals = code.to(half).double().numpy()[codes]
    want = (vals * xv.double().numpy()).sum(1) * scales
    err = np.abs(got - want) / np.abs(vals * xv.double().numpy()).sum(1).clip(1e-9)
    assert err.max() < (4e-3 if f16 else 2e-2) and np.median(err) < (5e-4 if f16 else 4e-3), err.max()
