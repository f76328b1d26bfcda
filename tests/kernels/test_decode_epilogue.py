"""The decode step's fused epilogues (LoRA up-projection + RoPE + cache write; + activation; + residual + RMSNorm)
against their pure-torch references and against the unfused math written out with transformers' own pieces."""
import pytest
import torch
from conftest import DEVICE, DTYPES, TOL, kernel_module

from fastlm.kernels._triton import force_triton


def _draw(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, device="cpu") * scale).to(DEVICE, dtype)


def _projection_output(g, b, n, r, dtype, splits):
    """A projection's output with the adapters' x A^T as its last r columns, as the engine's GEMVs write it: one
    [b, n + r] tensor in the activation dtype (cuBLAS), or `splits` fp32 partial sums [S, b, n + r] (split-K)."""
    if splits == 1:
        return _draw(g, b, n + r, dtype=dtype)
    return _draw(g, splits, b, n + r, scale=splits ** -0.5)


def _plain_sum(t):
    return t.float().sum(0) if t.dim() == 3 else t.float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora,h,kv,d,splits,config", [
    (True, 4, 2, 16, 1, None), (False, 4, 4, 16, 1, None), (True, 3, 1, 12, 1, None), (True, 4, 2, 16, 3, None),
    (False, 2, 1, 16, 2, None),
    (True, 3, 1, 12, 2, (4, 1)),  # a head over programs of 4 rotation pairs (6 pairs: the second one half full)
    (True, 4, 2, 16, 1, (2, 2)),
])
def test_qkv_rope_cache_matches_rope_and_cache_write(dtype, lora, h, kv, d, splits, config):
    mod = kernel_module("decode_epilogue")
    g = torch.Generator().manual_seed(0)
    b, length, r = 3, 9, 6
    n = (h + 2 * kv) * d
    # y carries the adapters' x A^T as its last columns, as the engine's GEMV with A's rows appended writes it
    y_full = _projection_output(g, b, n, r, dtype, splits)
    y, xa = y_full[..., :n], (y_full[..., n:] if lora else None)
    bt = _draw(g, r, n, dtype=dtype, scale=0.1) if lora else None
    theta = torch.arange(length, dtype=torch.float32)[:, None] * (0.3 ** torch.arange(d // 2, dtype=torch.float32))
    cos = torch.cat([theta.cos(), theta.cos()], -1).to(DEVICE, dtype)
    sin = torch.cat([theta.sin(), theta.sin()], -1).to(DEVICE, dtype)
    pos = torch.tensor([0, 5, 8], device=DEVICE)
    kc, vc = _draw(g, b + 1, kv, length, d, dtype=dtype), _draw(g, b + 1, kv, length, d, dtype=dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = mod.qkv_rope_cache_reference(y, xa, bt, cos, sin, pos, kc_ref, vc_ref, h, kv, d)
    with force_triton():
        if config is None:
            got = mod.qkv_rope_cache(y, xa, bt, cos, sin, pos, kc, vc, h, kv, d)
        else:
            got = mod._launch_qkv(y, xa, bt, [0, 0, 0], cos, sin, pos, kc, vc, h, kv, d, config=config)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(kc.float(), kc_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(vc.float(), vc_ref.float(), atol=atol, rtol=rtol)
    # the reference against the math written out: q = y_q + xa B_q, rotated by HF's rotate-half at its position
    if dtype == torch.float32:
        full = _plain_sum(y) + (_plain_sum(xa) @ bt.float() if lora else 0)
        q0 = full[1, :d]
        c, s = cos[5].float(), sin[5].float()
        rot = torch.cat([-q0[d // 2:], q0[:d // 2]])
        torch.testing.assert_close(got[1, :d], q0 * c + rot * s, atol=1e-5, rtol=1e-5)
        v_last = full[2, (h + kv) * d + (kv - 1) * d:(h + kv) * d + kv * d]
        torch.testing.assert_close(vc[2, kv - 1, 8], v_last, atol=1e-5, rtol=1e-5)
        assert torch.equal(vc[3], vc_ref[3])  # the slot no row owns is untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("lora,splits,config", [(True, 1, None), (False, 1, None), (True, 4, None),
                                               (True, 4, (256, 4)), (False, 2, (1024, 4))])  # the configs before
def test_lora_act_mul_matches_gated_mlp(dtype, act, lora, splits, config):
    mod = kernel_module("decode_epilogue")
    g = torch.Generator().manual_seed(1)
    b, inter, r = 2, 1500, 5  # inter past one 1024 block
    y_full = _projection_output(g, b, 2 * inter, r, dtype, splits) * 2
    y, xa = y_full[..., :2 * inter], (y_full[..., 2 * inter:] if lora else None)
    bt = _draw(g, r, 2 * inter, dtype=dtype, scale=0.1) if lora else None
    code = mod.ACTIVATIONS[act]
    ref = mod.lora_act_mul_reference(y, xa, bt, inter, code, dtype)
    with force_triton():
        if config is None:
            got = mod.lora_act_mul(y, xa, bt, inter, code, dtype)
        else:
            got = mod._launch_act(y, xa, bt, [0, 0], inter, code, dtype, config=config)
    assert got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)
    if dtype == torch.float32:
        from transformers.activations import ACT2FN

        full = _plain_sum(y) + (_plain_sum(xa) @ bt if lora else 0)
        fn = ACT2FN["silu" if act == "silu" else "gelu_pytorch_tanh"]
        torch.testing.assert_close(got, fn(full[:, :inter]) * full[:, inter:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("lora,splits", [(True, 1), (False, 1), (True, 2)])
def test_lora_residual_norm_matches_hf_rmsnorm(dtype, gemma, lora, splits):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    mod = kernel_module("decode_epilogue")
    g = torch.Generator().manual_seed(2)
    b, hidden, r = 3, 96, 4
    x, y_full = _draw(g, b, hidden, dtype=dtype), _projection_output(g, b, hidden, r, dtype, splits)
    y, xa = y_full[..., :hidden], (y_full[..., hidden:] if lora else None)
    bt = _draw(g, r, hidden, dtype=dtype, scale=0.1) if lora else None
    norm = (GemmaRMSNorm(hidden, eps=1e-6) if gemma else LlamaRMSNorm(hidden, eps=1e-6)).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(_draw(g, hidden, dtype=dtype, scale=0.5))
    ref_s, ref = mod.lora_residual_norm_reference(x, y, xa, bt, norm.weight, 1e-6, gemma)
    with force_triton():
        s, out = mod.lora_residual_norm(x, y, xa, bt, norm.weight, 1e-6, gemma)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(s.float(), ref_s.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    with torch.no_grad():  # the reference is transformers' norm of the residual sum
        expect_s = x + (_plain_sum(y) + (_plain_sum(xa) @ bt.float() if lora else 0)).to(dtype)
        torch.testing.assert_close(ref.float(), norm(expect_s).float(), atol=atol, rtol=rtol)


def _norm_case(g, b, hidden, r, dtype, splits, lora, offset=0):
    """Inputs of lora_residual_norm: x, y, xa, the lora argument and a weight. offset: the adapter's first rank in
    xa (compact adapters; the ranks before it belong to another slice)."""
    x, y_full = _draw(g, b, hidden, dtype=dtype), _projection_output(g, b, hidden, offset + r, dtype, splits)
    y, xa = y_full[..., :hidden], (y_full[..., hidden:] if lora else None)
    bt = _draw(g, r, hidden, dtype=dtype, scale=0.1) if lora else None
    arg = (bt, [offset]) if lora and offset else bt
    return x, y, xa, arg, _draw(g, hidden, dtype=dtype, scale=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,block,rows,splits,lora,offset,gemma", [
    (300, None, 3, 1, True, 0, False),  # the default config: 3 programs a row, the last one 44 columns wide
    (1000, None, 1, 4, True, 5, True),
    (256, None, 2, 2, False, 0, False),  # whole blocks only
    (130, 32, 4, 3, True, 0, True),
    (96, 32, 1, 1, False, 0, True),
    (200, 64, 2, 1, True, 2, False),
])
def test_residual_norm_over_several_programs_a_row(dtype, hidden, block, rows, splits, lora, offset, gemma):
    """A row split over programs (the last to finish normalises it) gives the reference's residual sum and norm,
    twice in a row: each launch leaves the row counters at 0 for the next (else the second launch writes no norm)."""
    mod = kernel_module("decode_epilogue")
    g = torch.Generator().manual_seed(5)
    atol, rtol = TOL[dtype]
    for _ in range(2):
        x, y, xa, lora_arg, w = _norm_case(g, rows, hidden, 4, dtype, splits, lora, offset)
        ref_s, ref = mod.lora_residual_norm_reference(x, y, xa, lora_arg, w, 1e-5, gemma)
        with force_triton():
            if block is None:
                assert -(-hidden // mod.NORM_CONFIG[0]) > 1  # the default config does split these rows
                s, out = mod.lora_residual_norm(x, y, xa, lora_arg, w, 1e-5, gemma)
            else:
                bt, offsets = mod._adapter_parts(lora_arg, 1)
                s, out = mod._launch_norm(x, y, xa, bt, offsets, w, 1e-5, gemma, config=(block, 1))
        torch.testing.assert_close(s.float(), ref_s.float(), atol=atol, rtol=rtol)
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
        assert not mod.row_counters(x.device, rows).any()


def test_row_counters_not_allocated_inside_a_graph_capture(monkeypatch):
    """A first split residual norm inside a CUDA graph capture cannot allocate its counters: the error says to
    run the step eagerly first or reserve them."""
    from fastlm.errors import UnsupportedFeatureError

    mod = kernel_module("decode_epilogue")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(UnsupportedFeatureError, match=r"row_counters\(device, rows\) first"):
        mod.row_counters(torch.device("cuda", 0), 10 ** 6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k", [(1, 50, 96), (3, 33, 130), (2, 64, 64)])
def test_split_k_gemv_partials_sum_to_the_product(dtype, rows, n, k):
    """The decode GEMV's partial sums over K splits add up to x @ W^T (N and K tails masked)."""
    mod = kernel_module("decode_gemv")
    g = torch.Generator().manual_seed(3)
    x, w = _draw(g, rows, k, dtype=dtype), _draw(g, n, k, dtype=dtype)
    cfg = (16, 32, 1, 1)
    with force_triton():
        parts = mod.gemv_partials(x, w, cfg)
    assert parts.shape == (mod.splits(k, cfg), rows, n) and parts.dtype == torch.float32
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(parts.sum(0), mod.gemv_reference(x, w)[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(parts.sum(0), (x.double() @ w.double().t()).float(), atol=atol, rtol=rtol)


def test_compact_adapters_read_each_slice_own_ranks():
    """gate and up with one adapter each share B^T's rows; xa holds gate's ranks then up's: the compact form (B^T
    [r, N], offsets 0 and r) gives what the block-diagonal B^T [2r, N] gives."""
    mod = kernel_module("decode_epilogue")
    g = torch.Generator().manual_seed(4)
    b, inter, r = 2, 40, 3
    y, xa = _draw(g, b, 2 * inter), _draw(g, b, 2 * r)
    b_gate, b_up = _draw(g, r, inter, scale=0.3), _draw(g, r, inter, scale=0.3)
    block_diag = torch.zeros(2 * r, 2 * inter)
    block_diag[:r, :inter], block_diag[r:, inter:] = b_gate, b_up
    compact = (torch.cat([b_gate, b_up], 1), [0, r])
    expect = mod.lora_act_mul_reference(y, xa, block_diag, inter, mod.SILU)
    with force_triton():
        got = mod.lora_act_mul(y, xa, compact, inter, mod.SILU)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.lora_act_mul_reference(y, xa, compact, inter, mod.SILU), expect)


def _bench_script():
    import importlib.util
    from pathlib import Path

    kernel_module("decode_epilogue")
    path = Path(__file__).resolve().parents[2] / "scripts" / "gpu_epilogue_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_epilogue_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gpu_bench_cases_run_here():
    """scripts/gpu_epilogue_bench.py's cases at a tiny model's shapes: its frozen kernels from before and the
    current ones (default and multi-program configs) match the references, so a GPU run fails only on the GPU."""
    bench = _bench_script()
    dims = dict(hidden=96, inter=80, heads=2, kv=1, head_dim=16)
    split = {"norm": (32, 1), "act": (32, 1), "qkv": (4, 1)}  # rows over 3 programs, heads over 2
    for op in ("norm", "act", "qkv"):
        for lora, splits in ((None, 1), ("compact", 4), ("blockdiag", 2)):
            new, old, ref, _ = bench.make_case(op, dims, lora, splits, 2, DEVICE, dtype=torch.float16)
            with force_triton():
                for got in (new(), new(split[op]), old()):
                    assert bench.max_error(got, ref) <= bench.tolerance(ref), (op, lora)


def test_gpu_bench_flow_reports_per_token_time(monkeypatch, capsys):
    """The bench's whole flow at tiny shapes with a stand-in timer (old 2 us, new 1 us a launch, configs 0.5 us
    and up): every case checked, the sweep ranked, the table printed, the 1B per-token sums right."""
    bench = _bench_script()
    monkeypatch.setattr(bench, "MODELS", {"1B": dict(hidden=160, inter=40, heads=2, kv=1, head_dim=8),
                                          "8B": dict(hidden=64, inter=24, heads=2, kv=2, head_dim=8)})
    monkeypatch.setattr(bench, "RACE_RUNS", 2)
    monkeypatch.setattr(bench, "SWEEP", {"norm": [(64, 1), (32, 2)], "act": [(16, 1)], "qkv": [(2, 1), (4, 1)]})

    def timer(op, dims, lora, splits, rows, device, configs):
        return {"old": (2.0, 1.5), "new": (1.0, 0.8), **{c: (0.5 + c[0] / 1000, float("nan")) for c in configs}}

    with force_triton():
        payload = bench.run(["1B", "8B"], DEVICE, True, dtype=torch.float16, timer=timer)
    assert payload["ok"] and payload["counters_zero"]
    # 32 norms, 16 activations, 16 qkv; the best configs: norm (32, 2) 0.532, act (16, 1) 0.516, qkv (2, 1) 0.502
    assert payload["per_token_1b_us"] == {"old": 128.0, "new": 64.0, "best": 33.3}
    assert payload["sweeps"]["norm/1B"] == {"(32, 2)": 0.532, "(64, 1)": 0.564}
    assert len(payload["summary"]) == 6 and capsys.readouterr().out.rstrip().splitlines()[-1].startswith("1B per token")
