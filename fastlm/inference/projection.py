"""A decoder layer's projections as the engine multiplies them (used by decoder.py).

`Projection(modules, sizes, fuse)`: several output groups from one input (q/k/v, gate/up, o, down). Module mode calls
the HF modules as they are (LoRA via PEFT's own forward, bitsandbytes 4-bit via its own matmul). Fused mode builds one
concatenated weight per group once, with the unmerged LoRA terms `scale * B(A x)` added per output slice: dense groups
carry the adapters' A rows inside the base weight (one GEMV gives the base output and x A^T), NF4 groups stay 4-bit
and small batches run the NF4 GEMV kernel. `outputs(x)` gives the groups; `raw(x)` gives what the decode epilogue
kernels take (the split-K GEMV's partial sums where it beats cuBLAS, and the adapters still to add).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NF4_MAX_ROWS = 4  # up to this many rows (decode batch x tokens) read NF4 weights directly; more dequantize


def _read_base(base):
    """("dense", weight, bias) for nn.Linear, ("nf4", packed, absmax, code, blocksize, bias) for a bitsandbytes
    NF4 Linear4bit, else None."""
    if type(base) is nn.Linear:
        return ("dense", base.weight, base.bias)
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if type(base).__name__ == "Linear4bit" and state is not None and getattr(state, "quant_type", "") == "nf4":
        from ..kernels.decode_nf4 import nf4_absmax_fp32

        return ("nf4", base.weight.data, nf4_absmax_fp32(state), state.code.float(), int(state.blocksize),
                base.bias)
    return None


def _lora_terms(module):
    """(base read by _read_base, out_features, [(A, B, scale)]) of a linear or a PEFT LoRA linear in its current
    adapter state, or None when the fused path cannot read it exactly (DoRA, other adapter kinds, other layers)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        read = _read_base(module)
        return None if read is None else (read, module.out_features, [])
    read = _read_base(base)
    if read is None or not hasattr(module, "lora_A"):
        return None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return (read, base.out_features, [])
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            return None
        variants = getattr(module, "lora_variant", {}) or {}
        if name in variants:
            return None
        terms.append((module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])))
    return (read, base.out_features, terms)


class Projection:
    """Several output groups from one input: `outputs(x) -> list of tensors` split by `sizes`.

    Module mode calls the HF modules (the exact PEFT / bitsandbytes forward). Fused mode multiplies one
    concatenated base weight and adds each LoRA term to its slice: base + scale * B(A x), unmerged. For NF4
    bases the fused weight stays 4-bit: small batches run the NF4 GEMV kernel, larger ones call the modules.
    """

    def __init__(self, modules: list[nn.Module], sizes: list[int], fuse: bool, dtype=torch.bfloat16):
        self.modules = modules
        self.sizes = sizes
        self.dtype = dtype  # of the activations it multiplies (the NF4 GEMV is tuned for it)
        self.fused = False
        self.kind = "modules"
        if fuse:
            read = [_lora_terms(m) for m in modules]
            if all(r is not None for r in read) and len({r[0][0] for r in read}) == 1:
                self._build_fused(read)

    def _build_fused(self, read) -> None:
        kind = read[0][0][0]
        bases = [r[0] for r in read]
        outs = [r[1] for r in read]
        with torch.no_grad():
            biases = [b[-1] for b in bases]
            if any(b is not None for b in biases):
                ref = bases[0][1]
                self.bias = torch.cat([b if b is not None else torch.zeros(o, dtype=torch.float32, device=ref.device)
                                       for b, o in zip(biases, outs)], 0)
            else:
                self.bias = None
            if kind == "dense":
                ws = [b[1] for b in bases]
                self.weight = torch.cat(ws, 0) if len(ws) > 1 else ws[0]
                if self.bias is not None:
                    self.bias = self.bias.to(self.weight.dtype)
            else:
                k = self.modules[0].in_features if hasattr(self.modules[0], "in_features") else None
                k = k or self.modules[0].base_layer.in_features
                blocksize = bases[0][4]
                if any(b[4] != blocksize for b in bases) or any(o * k % blocksize for o in outs) or any(
                        not torch.equal(b[3], bases[0][3]) for b in bases):
                    return
                self.packed = torch.cat([b[1].reshape(-1) for b in bases])
                self.absmax = torch.cat([b[2] for b in bases])
                self.code = bases[0][3]
                self.blocksize, self.k, self.n = blocksize, k, sum(outs)
                from ..kernels.decode_nf4 import nf4_gemv_config

                self.nf4_config = nf4_gemv_config(self.n, k, blocksize, self.packed.device, packed=self.packed,
                                                  dtype=self.dtype)
        self.lora = []  # (A, B, scale, start, stop) over the concatenated output: the live adapter tensors
        start = 0
        for (_, out, terms) in read:
            for a, b, s in terms:
                self.lora.append((a, b, s, start, start + out))
            start += out
        self.n_out = start
        self.a_rows = False
        if self.lora:
            # all adapters of the group in two products: A stacked [R, K] and B block-diagonal [N, R] with the
            # scale folded in; `refresh_adapters` copies the live A/B in (after training steps, before decoding).
            # Dense groups append A's rows to the base weight, so x @ [W; A]^T gives the base output and x A^T
            # in one GEMV (A is then held in the base dtype; the B product stays in the adapter's dtype).
            a0 = self.lora[0][0]
            rank = sum(a.shape[0] for a, *_ in self.lora)
            if kind == "dense":
                w = self.weight
                self.weight = torch.cat([w, torch.zeros(rank, w.shape[1], dtype=w.dtype, device=w.device)], 0)
                if self.bias is not None:
                    self.bias = torch.cat([self.bias, self.bias.new_zeros(rank)])
                self.lora_a = self.weight[start:]
                self.a_rows = True
            else:
                self.lora_a = torch.zeros(rank, a0.shape[1], dtype=a0.dtype, device=a0.device)
            self.lora_b = torch.zeros(start, rank, dtype=a0.dtype, device=a0.device)
            self._epilogue_adapters(start, rank, a0)
            self.refresh_adapters()
        self.kind = kind
        self.fused = True
        self.gemv = None  # split-K GEMV config (kernels/decode_gemv.py) where it beats cuBLAS on this device

    def _epilogue_adapters(self, n: int, rank: int, a0) -> None:
        """B^T for the epilogue kernels and each output slice's first rank in x A^T (`xa_offsets`, one per entry of
        `sizes`). With one adapter per module and equal ranks the slices' B^T share rows (`compact`: [r, N], the
        kernels read only a slice's own ranks); otherwise B^T is block-diagonal [R, N] and every offset 0."""
        ranks = [a.shape[0] for a, *_ in self.lora]
        spans = [(start, stop) for *_, start, stop in self.lora]
        self.compact = len(set(ranks)) == 1 and len(set(spans)) == len(spans)
        self.lora_bt = torch.zeros(ranks[0] if self.compact else rank, n, dtype=a0.dtype, device=a0.device)
        firsts, r0 = [], 0
        for r, (start, stop) in zip(ranks, spans):
            firsts.append((start, stop, r0))
            r0 += r
        self.xa_offsets, col = [], 0
        for size in self.sizes:
            hit = [first for start, stop, first in firsts if start <= col < stop]
            self.xa_offsets.append(hit[0] if self.compact and hit else 0)
            col += size

    def tune_gemv(self, max_splits: int) -> None:
        """Pick the split-K GEMV for `raw` (dense fused weights without bias) when it beats cuBLAS here; its
        consumer adds at most `max_splits` partial sums per output."""
        if self.fused and self.kind == "dense" and self.bias is None:
            from ..kernels.decode_gemv import gemv_config

            self.gemv = gemv_config(self.weight, max_splits=max_splits)

    @torch.no_grad()
    def refresh_adapters(self) -> None:
        r0 = 0
        for a, b, s, start, stop in self.lora:
            r1 = r0 + a.shape[0]
            self.lora_a[r0:r1].copy_(a)
            self.lora_b[start:stop, r0:r1].copy_(b * s)
            if self.compact:
                self.lora_bt[:, start:stop].copy_((b * s).t())
            r0 = r1
        if not self.compact:
            self.lora_bt.copy_(self.lora_b.t())

    def _module_outputs(self, x):
        outs = [m(x) for m in self.modules]
        if len(outs) == len(self.sizes):
            return outs
        return list(torch.split(outs[0], self.sizes, dim=-1))

    def _modules_only(self, x) -> bool:
        return not self.fused or (self.kind == "nf4" and x.numel() // x.shape[-1] > NF4_MAX_ROWS)

    def _base(self, x):
        """(the base product, with A's rows as its last columns where the weight holds them; x A^T or None)."""
        if self.kind == "nf4":
            rows = x.numel() // x.shape[-1]
            from ..kernels.decode_nf4 import nf4_gemv

            y = nf4_gemv(x.reshape(rows, self.k), self.packed, self.absmax, self.code, self.n, self.k,
                         self.blocksize, config=self.nf4_config).reshape(*x.shape[:-1], self.n)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.a_rows:  # the last rows of the GEMV are x A^T
            return y, y[..., self.n_out:]
        if self.lora:
            return y, F.linear(x.to(self.lora_a.dtype), self.lora_a)
        return y, None

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._modules_only(x):
            return self._module_outputs(x)
        y, xa = self._base(x)
        y = y[..., :self.n_out] if self.a_rows else y
        if self.lora:
            y = y + _lora_up(xa.to(self.lora_b.dtype), self.lora_b).to(y.dtype)
        return list(torch.split(y, self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]

    def raw(self, x: torch.Tensor):
        """For the decode epilogue kernels, x [rows, K] -> (y [rows, >= N] or [S, rows, >= N] fp32 partial sums of
        the split-K GEMV, xa [rows, R] (or its partial sums) or None, (B^T, xa_offsets) or None): the outputs side
        by side in y's first N columns, still without the adapters' term, which the epilogue adds (the modules' own
        outputs, adapters included, where the weights are not fused)."""
        if self._modules_only(x):
            outs = self._module_outputs(x)
            return (torch.cat(outs, -1) if len(outs) > 1 else outs[0]), None, None
        if self.gemv is not None:  # [S, rows, N] fp32 partial sums, which the epilogue adds
            from ..kernels.decode_gemv import gemv_partials

            y = gemv_partials(x, self.weight, self.gemv)
            return y, (y[..., self.n_out:] if self.a_rows else None), self._adapters()
        y, xa = self._base(x)
        return y, xa, self._adapters()

    def _adapters(self):
        return (self.lora_bt, self.xa_offsets) if self.lora else None


def _lora_up(xa: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """xa [..., R] @ b[N, R]^T. Compiled decode steps (a few rows, up to 4096 outputs) write it as a
    product-and-sum, which inductor fuses with the addition that follows, instead of a separate small matmul launch
    (wider outputs, e.g. gate/up, were slower that way on the H100: 11 us against cuBLAS' 3 us GEMV)."""
    if torch.compiler.is_compiling() and xa.numel() // xa.shape[-1] <= 8 and b.shape[0] <= 4096:
        return (xa.unsqueeze(-2) * b).sum(-1)
    return F.linear(xa, b)
