"""Packed-row attention on the GPU: per-sequence SDPA (fastlm's padding-free path) against one causal SDPA over
the whole row and against transformers' block mask, fwd+bwd median ms. A tuning aid; table last."""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fastlm.patch.attention import packed_attention

torch.manual_seed(0)
H, KV, D = 32, 8, 64
lens = [1500, 300, 900, 1400]
S = sum(lens)
bounds, a = [], 0
for n in lens:
    bounds.append((a, a + n))
    a += n
q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
seg = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
mask = (seg[:, None] == seg[None, :]) & torch.ones(S, S, dtype=torch.bool, device="cuda").tril()


def run(fn):
    def f():
        out = fn()
        out.backward(g)
    return do_bench(f, warmup=20, rep=200)


rows = {
    "packed (per-seq sdpa, gqa)": lambda: packed_attention(q, k, v, bounds, D ** -0.5),
    "packed (per-seq sdpa, kv repeated)": lambda: packed_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), bounds, D ** -0.5),
    "whole row causal (wrong, speed ref)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2),
    "block mask (transformers)": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask[None, None]).transpose(1, 2),
}
for name, fn in rows.items():
    print(f"{name:40} {run(fn):8.3f} ms")
