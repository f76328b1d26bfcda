"""GPU check of fastlm's core Triton kernels: bf16 correctness at real sizes and speed/memory vs PyTorch.

For every op (RMSNorm Llama/Gemma/q-k-norm, RoPE, SwiGLU, GeGLU, the full fine-tuning MLP of fastlm.patch.fast_mlp
with trainable gate/up/down weights, cross-entropy, fused linear cross-entropy) at the sizes of Llama-3.2-1B
(hidden 2048, 32q/8kv heads of 64, vocab 128256, 8192 tokens) and Gemma-2-2B (softcap 30, vocab 256000), it runs
forward + backward of
  * the Triton op on bf16 inputs,
  * the pure-torch reference on the same bf16 inputs (what transformers computes),
  * the reference on fp32 copies of those inputs (the "truth"),
and reports the relative error (||a - truth|| / ||truth||, worst over the output and every input gradient) of the
first two. Then it times forward + backward of the Triton op, the eager reference and torch.compile(reference) with
triton.testing.do_bench (median, p20, p80 in ms) and records each one's peak extra CUDA memory.

Run on the GPU machine (one command; about 3-6 minutes, most of it torch.compile):

    PYTHONPATH=. python scripts/gpu_kernel_check.py [--ops rms_norm_llama,ce_llama] [--no-compile]

Smoke-test the script itself on a CPU (tiny shapes, Triton interpreter, wall-clock timing):

    PYTHONPATH=. python scripts/gpu_kernel_check.py --cpu-smoke

Prints a table last, then one JSON line. Exit status 1 when any op's error exceeds its bound
(2 x the bf16 reference's own error + 1e-3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


@dataclass
class Case:
    name: str
    shape: str
    fast: object  # callable(*inputs) -> tensor or tuple
    ref: object
    inputs: tuple  # tensors; those with requires_grad get gradients
    grad_outputs: tuple | None = None  # None: scalar loss
    notes: dict = field(default_factory=dict)


DTYPE = {"value": torch.bfloat16}  # fp16 in the CPU smoke test (the interpreter's bf16 arithmetic is not exact)


def _rand(*shape, device, scale=1.0, grad=True):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(DTYPE["value"]).requires_grad_(grad)


def _labels(shape, vocab, device, ignore_frac=0.1):
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return labels


def build_cases(device: str, small: bool) -> list[Case]:
    from fastlm.kernels.activations import geglu, swiglu
    from fastlm.kernels.cross_entropy import cross_entropy
    from fastlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from fastlm.kernels.reference import (
        apply_rope_reference,
        cross_entropy_reference,
        fused_linear_cross_entropy_reference,
        geglu_reference,
        rms_norm_reference,
        swiglu_reference,
    )
    from fastlm.kernels.rms_norm import rms_norm
    from fastlm.kernels.rope import apply_rope

    # Llama-3.2-1B / Gemma-2-2B sizes, or tiny ones for the CPU smoke test
    tokens, batch, seq = (24, 2, 12) if small else (8192, 4, 2048)
    hidden, inter, heads, kv, head_dim, vocab = (48, 96, 4, 2, 16, 1000) if small else (2048, 8192, 32, 8, 64, 128256)
    g_hidden, g_inter, g_vocab, g_tokens = (40, 80, 1500, 16) if small else (2304, 9216, 256000, 4096)
    q_heads, q_dim = (2, 32) if small else (16, 128)
    cases = []
    d = device

    cases.append(Case("rms_norm_llama", f"x({tokens},{hidden}) w({hidden})",
                      lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_reference(x, w, 1e-5),
                      (_rand(tokens, hidden, device=d), _rand(hidden, device=d, scale=0.2)),
                      (_rand(tokens, hidden, device=d, grad=False),)))
    cases.append(Case("rms_norm_gemma", f"x({tokens},{g_hidden}) 1+w",
                      lambda x, w: rms_norm(x, w, 1e-6, 1.0, "gemma"),
                      lambda x, w: rms_norm_reference(x, w, 1e-6, 1.0, "gemma"),
                      (_rand(tokens, g_hidden, device=d), _rand(g_hidden, device=d, scale=0.2)),
                      (_rand(tokens, g_hidden, device=d, grad=False),)))
    cases.append(Case("qk_norm_frozen", f"x({tokens},{q_heads},{q_dim}) w({q_dim}) frozen",
                      lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_reference(x, w, 1e-6),
                      (_rand(tokens, q_heads, q_dim, device=d), _rand(q_dim, device=d, scale=0.2, grad=False)),
                      (_rand(tokens, q_heads, q_dim, device=d, grad=False),)))

    cos, sin = _llama_cos_sin(batch, seq, head_dim, d, small)
    q = _rand(batch, seq, heads, head_dim, device=d, grad=False).transpose(1, 2).requires_grad_(True)
    k = _rand(batch, seq, kv, head_dim, device=d, grad=False).transpose(1, 2).requires_grad_(True)
    cases.append(Case("rope_llama3", f"q({batch},{heads},{seq},{head_dim}) k({batch},{kv},{seq},{head_dim})",
                      lambda a, b: apply_rope(a, b, cos, sin), lambda a, b: apply_rope_reference(a, b, cos, sin),
                      (q, k), (torch.randn_like(q), torch.randn_like(k))))

    for name, n, fn_fast, fn_ref in (
            ("swiglu", inter, swiglu, swiglu_reference),
            ("geglu_tanh", g_inter, lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_reference(g, u, "tanh")),
            ("geglu_erf", inter, lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_reference(g, u, "none"))):
        cases.append(Case(name, f"g,u({tokens},{n})", fn_fast, fn_ref,
                          (_rand(tokens, n, device=d, scale=2.0), _rand(tokens, n, device=d)),
                          (_rand(tokens, n, device=d, grad=False),)))

    # the full fine-tuning MLP (fastlm.patch.fast_mlp): down(act(gate(x)) * up(x)) with trainable weights, against
    # transformers' eager MLP
    for name, n_hidden, n_inter, act in (("mlp_full_ft_llama", hidden, inter, "silu"),
                                         ("mlp_full_ft_gemma2", g_hidden, g_inter, "gelu_tanh")):
        cases.append(Case(name, f"x({tokens},{n_hidden}) gate/up({n_inter},{n_hidden}) down({n_hidden},{n_inter})",
                          _mlp_fast(act), _mlp_eager(act),
                          (_rand(tokens, n_hidden, device=d), _rand(n_inter, n_hidden, device=d, scale=0.02),
                           _rand(n_inter, n_hidden, device=d, scale=0.02),
                           _rand(n_hidden, n_inter, device=d, scale=0.02)),
                          (_rand(tokens, n_hidden, device=d, grad=False),)))

    targets = _labels((tokens,), vocab, d)
    cases.append(Case("ce_llama", f"logits({tokens},{vocab})", lambda z: cross_entropy(z, targets),
                      lambda z: cross_entropy_reference(z, targets), (_rand(tokens, vocab, device=d, scale=2.0),)))
    g_targets = _labels((g_tokens,), g_vocab, d)
    cases.append(Case("ce_gemma2_softcap30", f"logits({g_tokens},{g_vocab})",
                      lambda z: cross_entropy(z, g_targets, softcap=30.0),
                      lambda z: cross_entropy_reference(z, g_targets, softcap=30.0),
                      (_rand(g_tokens, g_vocab, device=d, scale=20.0),)))

    labels = _labels((batch, seq), vocab, d)
    for trainable in (False, True):
        cases.append(Case(f"flce_llama{'_train_head' if trainable else ''}",
                          f"h({batch},{seq},{hidden}) W({vocab},{hidden}){'' if trainable else ' frozen'}",
                          lambda h, w: fused_linear_cross_entropy(h, w, labels),
                          lambda h, w: fused_linear_cross_entropy_reference(h, w, labels),
                          (_rand(batch, seq, hidden, device=d),
                           _rand(vocab, hidden, device=d, scale=0.02, grad=trainable))))
    g_batch, g_seq = batch // 2 or 1, g_tokens // (batch // 2 or 1)
    g_labels = _labels((g_batch, g_seq), g_vocab, d)
    cases.append(Case("flce_gemma2_softcap30", f"h({g_batch},{g_seq},{g_hidden}) W({g_vocab},{g_hidden}) frozen",
                      lambda h, w: fused_linear_cross_entropy(h, w, g_labels, softcap=30.0),
                      lambda h, w: fused_linear_cross_entropy_reference(h, w, g_labels, softcap=30.0),
                      (_rand(g_batch, g_seq, g_hidden, device=d),
                       _rand(g_vocab, g_hidden, device=d, scale=0.05, grad=False))))
    return cases


def _mlp_fast(act):
    """The MLP as fastlm.patch.fast_mlp runs it on plain nn.Linear projections (kernel backward in place)."""
    from torch.nn.functional import linear

    from fastlm.patch.fast_mlp import gated

    return lambda x, wg, wu, wd: linear(gated(linear(x, wg), linear(x, wu), act, True), wd)


def _mlp_eager(act):
    """transformers' gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    import torch.nn.functional as F

    fn = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    return lambda x, wg, wu, wd: F.linear(fn(F.linear(x, wg)) * F.linear(x, wu), wd)


def _llama_cos_sin(batch, seq, head_dim, device, small):
    """cos, sin from the real LlamaRotaryEmbedding of Llama-3.2-1B (llama3 rope scaling), bf16 as in the model."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from fastlm.bench.shapes import shape_config

    config = shape_config("tiny-llama" if small else "llama-3.2-1b")
    if small:
        config.head_dim = head_dim
    rotary = LlamaRotaryEmbedding(config).to(device)
    pos = torch.arange(seq, device=device)[None].expand(batch, seq)
    return rotary(torch.zeros(1, device=device, dtype=DTYPE["value"]), pos)


def _fwd_bwd(fn, inputs, grad_outputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_outputs)
    return outs


def _results(fn, inputs, grad_outputs):
    """(outputs..., input grads...) as fp32 tensors, computed on fresh leaf copies of inputs."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = _fwd_bwd(fn, leaves, grad_outputs)
    return [o.detach().float() for o in outs] + [x.grad.float() for x in leaves if x.requires_grad]


def _rel_err(got, truth) -> float:
    return max((a - b).norm().item() / max(b.norm().item(), 1e-30) for a, b in zip(got, truth))


def check(case: Case) -> dict:
    fast = _results(case.fast, case.inputs, case.grad_outputs)
    bf16_ref = _results(case.ref, case.inputs, case.grad_outputs)
    inputs32 = tuple(t.detach().float().requires_grad_(t.requires_grad) for t in case.inputs)
    grads32 = None if case.grad_outputs is None else tuple(g.float() for g in case.grad_outputs)
    truth = _results(case.ref, inputs32, grads32)
    err_fast, err_ref = _rel_err(fast, truth), _rel_err(bf16_ref, truth)
    del fast, bf16_ref, truth, inputs32
    return {"rel_err_triton": err_fast, "rel_err_torch_bf16": err_ref, "ok": err_fast <= 2 * err_ref + 1e-3}


def _timer(cuda: bool):
    if cuda:
        from triton.testing import do_bench

        def bench(step, leaves):
            return do_bench(step, grad_to_none=leaves, quantiles=[0.5, 0.2, 0.8])
        return bench

    def wall(step, leaves):
        times = []
        for _ in range(3):
            for x in leaves:
                x.grad = None
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return [times[1], times[0], times[-1]]
    return wall


def time_impl(fn, case: Case, cuda: bool) -> dict:
    leaves = [t for t in case.inputs if t.requires_grad]

    def step():
        _fwd_bwd(fn, case.inputs, case.grad_outputs)

    try:
        step()  # warm-up (and compilation)
        for x in leaves:
            x.grad = None
        peak = None
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            for x in leaves:
                x.grad = None
        med, p20, p80 = _timer(cuda)(step, leaves)
        return {"ms": med, "p20": p20, "p80": p80, "peak_mb": peak}
    except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        for x in leaves:
            x.grad = None
        if cuda:
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    args = ap.parse_args()

    import triton

    from fastlm.kernels._triton import force_triton

    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        print("gpu_kernel_check: no CUDA device; run it on the GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    DTYPE["value"] = torch.bfloat16 if cuda else torch.float16
    torch.manual_seed(0)
    cases = build_cases(device, small=not cuda)
    wanted = [s for s in args.ops.split(",") if s]
    unknown = sorted(set(wanted) - {c.name for c in cases})
    if unknown:
        print(f"unknown --ops {unknown}; known: {', '.join(c.name for c in cases)}", file=sys.stderr)
        return 2
    cases = [c for c in cases if not wanted or c.name in wanted]

    rows = []
    with force_triton(not cuda):
        for case in cases:
            row = {"op": case.name, "shape": case.shape, **check(case)}
            row["triton"] = time_impl(case.fast, case, cuda)
            row["eager"] = time_impl(case.ref, case, cuda)
            if not args.no_compile and cuda:
                row["compile"] = time_impl(torch.compile(case.ref, dynamic=False), case, cuda)
            for base in ("eager", "compile"):
                if "ms" in row.get(base, {}) and "ms" in row["triton"]:
                    row[f"speedup_vs_{base}"] = row[base]["ms"] / row["triton"]["ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    def ms(r, k):
        v = r.get(k, {})
        return f"{v['ms']:.3f}" if "ms" in v else ("err" if "error" in v else "-")

    def mb(r, k):
        v = r.get(k, {}).get("peak_mb")
        return f"{v:.0f}" if v is not None else "-"

    name = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
    print(f"\n{name}  torch {torch.__version__}  triton {triton.__version__}  (fwd+bwd, median ms; peak extra MiB)")
    head = (f"{'op':22} {'rel_err':>9} {'torch16':>9} {'ok':>3} {'triton':>8} {'eager':>8} {'compile':>8} "
            f"{'x_eager':>7} {'x_comp':>7} {'MiB_tri':>8} {'MiB_eag':>8}")
    print(head)
    for r in rows:
        print(f"{r['op']:22} {r['rel_err_triton']:9.2e} {r['rel_err_torch_bf16']:9.2e} {'y' if r['ok'] else 'N':>3} "
              f"{ms(r, 'triton'):>8} {ms(r, 'eager'):>8} {ms(r, 'compile'):>8} "
              f"{r.get('speedup_vs_eager', float('nan')):7.2f} {r.get('speedup_vs_compile', float('nan')):7.2f} "
              f"{mb(r, 'triton'):>8} {mb(r, 'eager'):>8}")
    summary = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
               "all_ok": all(r["ok"] for r in rows), "results": rows}
    print(json.dumps(summary))
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
