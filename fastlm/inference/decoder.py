"""The decoder math of the engine: one place for every registered family's per-layer forward.

`DecoderView(model)` reads the HF model's own modules (embedding, each layer's projections, norms, MLP, final norm,
lm_head) and computes a forward over a static KV cache:

    forward(tokens [B, T], positions [B, T], slots [B], cache, last [B]) -> logits [B, V]

Family details honoured (read from the HF modules and config, never guessed): GQA, q/k-norm (Qwen3, Gemma 3),
Gemma's (1 + w) norms and sandwich norms (by calling the HF norm modules), the embedding scale (Gemma's scaled
embedding modules), `attn.scaling` (query_pre_attn_scalar), attention and final logit soft-caps, per-layer sliding
windows, per-layer-type RoPE tables (Gemma 3) and partial rotary (Phi-3), q/k/v biases (Qwen2).

Projections are `Projection` objects: either the HF modules called as they are (LoRA via PEFT's own forward,
bitsandbytes 4-bit via its own matmul) or, when `fuse=True`, one concatenated weight per group (q/k/v, gate/up)
built once, with unmerged LoRA terms `scale * B(A x)` added per output slice.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels._triton import use_triton
from ..kernels.decode_attention import decode_attention
from ..kernels.decode_epilogue import lora_act_mul, lora_residual_norm, qkv_rope_cache
from ..kernels.reference import rotate_half


NF4_MAX_ROWS = 4  # up to this many rows (decode batch x tokens) read NF4 weights directly; more dequantize
# decode batches up to this size run the fused epilogue kernels (each row program re-reads the adapters' B)
EPILOGUE_MAX_ROWS = 4
ROW_SPLITS = 4  # split-K partial sums the residual-norm epilogue (one program per row) may add
# the compiled decode step's attention: "sum" (products and sums, measured on the H100), "kernel" (the Triton
# decode-attention custom op) or "auto" (the engine captures each batch bucket both ways on the GPU and keeps the
# faster replay; scripts/gpu_engine_profile.py compares them)
COMPILED_DECODE_ATTENTION = "auto"


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


def _plain(module):
    """The module's own class forward, bound to it: transformers' norm math even where a training patch (fastlm's
    Triton RMSNorm) replaced the instance's forward. Inductor fuses that math into the compiled decode step itself;
    a hand-written kernel there would have to be re-compiled inside its graph (which failed on the H100 for the
    attention kernel) or stay an opaque launch."""
    if module is None:
        return None
    return functools.partial(type(module).forward, module)


@dataclass
class LayerView:
    input_norm: nn.Module
    post_attn_norm: nn.Module
    pre_ff_norm: nn.Module | None  # sandwich norms (Gemma 2/3): pre_feedforward + post_feedforward
    post_ff_norm: nn.Module | None
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    act: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    scaling: float
    window: int | None
    softcap: float | None
    rope_key: str
    epilogue: "Epilogue | None" = None  # set where the fused decode epilogues can compute this layer


@dataclass
class Norm:
    """An RMSNorm as the epilogue kernels compute it."""
    weight: torch.Tensor
    eps: float
    gemma: bool  # (1 + w) computed in fp32


@dataclass
class Epilogue:
    """What the decode epilogue kernels need of a layer beyond its projections."""
    post_attn: Norm
    next_norm: Norm | None  # the next layer's input norm, or the final norm after the last layer (set by the view)
    act: int  # decode_epilogue.ACTIVATIONS code


def _norm(module, arch) -> Norm | None:
    weight = getattr(module, "weight", None)
    if arch is None or weight is None or weight.ndim != 1:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", arch.norm_eps))
    return Norm(weight, float(eps), arch.norm_cast == "gemma")


def _epilogue(lv: LayerView, module_norm: nn.Module, arch, rot_dim: int, head_dim: int) -> Epilogue | None:
    """The layer's Epilogue, or None where the fused kernels do not compute what the layer does: q/k-norm, partial
    rotary, sandwich norms, an activation they lack, a norm without a weight."""
    from ..kernels.decode_epilogue import ACTIVATIONS

    if arch is None or lv.q_norm is not None or lv.pre_ff_norm is not None or rot_dim != head_dim or head_dim % 2:
        return None
    norm = _norm(module_norm, arch)
    if arch.activation not in ACTIVATIONS or norm is None:
        return None
    return Epilogue(norm, None, ACTIVATIONS[arch.activation])


def _rope_tables(model, max_len: int, device, dtype, layer_types: set[str]) -> dict[str, tuple]:
    """cos/sin [max_len, rot_dim] per RoPE kind, computed by the model's own rotary module."""
    rotary = model.model.rotary_emb
    pos = torch.arange(max_len, device=device)[None]
    x = torch.zeros(1, 1, device=device, dtype=dtype)
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
    tables = {}
    with torch.no_grad():
        for key in layer_types:
            cos, sin = rotary(x, pos, key) if takes_type else rotary(x, pos)
            tables[key] = (cos[0].to(dtype), sin[0].to(dtype))
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, R] with R <= D (partial rotary leaves the rest unchanged)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class DecoderView:
    """The model's weights arranged for the engine; see the module docstring for the forward."""

    def __init__(self, model, spec, max_len: int, fuse: bool = False):
        self.model = model
        config = model.config
        self.config = config
        inner = model.model
        self.embed = inner.embed_tokens
        self.final_norm = _plain(inner.norm)
        self.lm_head = model.lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        p = next(model.parameters())
        self.device = p.device
        self.dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
        attn_cap_attr = spec.attn_logit_softcap_attr if spec is not None else None
        attn_cap = getattr(config, attn_cap_attr, None) if attn_cap_attr else None
        layer_types = list(getattr(config, "layer_types", None) or [])
        self.layers = []
        rope_keys = set()
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        dt = self.dtype
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if hasattr(attn, "qkv_proj"):
                qkv = Projection([attn.qkv_proj], [q_out, kv_out, kv_out], fuse, dt)
            else:
                qkv = Projection([attn.q_proj, attn.k_proj, attn.v_proj], [q_out, kv_out, kv_out], fuse, dt)
            inter = config.intermediate_size
            if hasattr(mlp, "gate_up_proj"):
                gate_up = Projection([mlp.gate_up_proj], [inter, inter], fuse, dt)
            else:
                gate_up = Projection([mlp.gate_proj, mlp.up_proj], [inter, inter], fuse, dt)
            if hasattr(attn, "sliding_window"):
                window = attn.sliding_window
            else:
                window = getattr(config, "sliding_window", None)
            key = layer_types[i] if getattr(model.model.rotary_emb, "layer_types", None) else "default"
            rope_keys.add(key)
            sandwich = hasattr(layer, "pre_feedforward_layernorm")
            self.layers.append(LayerView(
                input_norm=_plain(layer.input_layernorm), post_attn_norm=_plain(layer.post_attention_layernorm),
                pre_ff_norm=_plain(layer.pre_feedforward_layernorm) if sandwich else None,
                post_ff_norm=_plain(layer.post_feedforward_layernorm) if sandwich else None,
                qkv=qkv, o=Projection([attn.o_proj], [config.hidden_size], fuse, dt),
                gate_up=gate_up, down=Projection([mlp.down_proj], [config.hidden_size], fuse, dt),
                act=mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn,
                q_norm=_plain(getattr(attn, "q_norm", None)), k_norm=_plain(getattr(attn, "k_norm", None)),
                scaling=float(getattr(attn, "scaling", self.head_dim ** -0.5)),
                window=int(window) if window else None, softcap=attn_cap, rope_key=key))
        self.rope = _rope_tables(model, max_len, self.device, self.dtype, rope_keys)
        arch = None
        if spec is not None:
            from ..arch.config import ArchConfigError, resolve

            try:
                arch = resolve(spec, config)
            except ArchConfigError:
                arch = None
        for lv, layer in zip(self.layers, inner.layers):
            lv.epilogue = _epilogue(lv, layer.post_attention_layernorm, arch, self.rope[lv.rope_key][0].shape[-1],
                                    self.head_dim)
        # the decode step runs the epilogues when every layer can: each layer's down projection ends in the next
        # layer's input norm (the final norm after the last), so the norms ride on the residual adds
        nexts = [_norm(layer.input_layernorm, arch) for layer in inner.layers[1:]] + [_norm(inner.norm, arch)]
        self.epilogues = all(lv.epilogue is not None for lv in self.layers) and all(n is not None for n in nexts)
        for lv, nxt in zip(self.layers, nexts):
            if lv.epilogue is not None:
                lv.epilogue.next_norm = nxt
        if self.epilogues:
            for lv in self.layers:
                # q/k/v and gate/up feed kernels with a program per head or column block; o and down feed the
                # residual norm, one program per row, which reads every partial sum of the row itself
                for proj, splits in ((lv.qkv, 16), (lv.o, ROW_SPLITS), (lv.gate_up, 16), (lv.down, ROW_SPLITS)):
                    proj.tune_gemv(splits)
        self.projections = [p for lv in self.layers for p in (lv.qkv, lv.o, lv.gate_up, lv.down)]
        self.fused = fuse and all(lv.qkv.fused and lv.gate_up.fused and lv.o.fused and lv.down.fused
                                  for lv in self.layers)
        # what the compiled step's attention is while it is being captured ("sum" or "kernel"); the engine sets it
        self.compiled_attention = "kernel" if COMPILED_DECODE_ATTENTION == "kernel" else "sum"

    def refresh_adapters(self) -> None:
        """Copy the live LoRA weights into the fused adapter buffers (cheap; in place, so graphs stay valid)."""
        for p in self.projections:
            if p.fused and p.lora:
                p.refresh_adapters()

    # ------------------------------------------------------------------ the math
    def attention(self, lv: LayerView, q, k, v, q_pos):
        """q [B, H, T, D]; k/v [B, kv, L, D] (the rows' cache slots); q_pos [B, T] -> [B, T, H*D].
        Key j is seen by a query at position p when j <= p (and j > p - window on sliding layers)."""
        b, h, t, d = q.shape
        compiling = torch.compiler.is_compiling()
        if t == 1 and (not compiling or self.compiled_attention == "kernel") and use_triton(q, k, v):
            # decode on the GPU: one Triton launch reading only the allowed keys
            return decode_attention(q, k, v, q_pos[:, 0], lv.scaling, lv.softcap, lv.window)
        g = h // self.n_kv
        qg = q.reshape(b, self.n_kv, g * t, d)
        if t == 1 and compiling:
            # compiled decode step with compiled_attention "sum": products and sums over the whole static cache,
            # which inductor turns into reduction kernels (the engine times this against the split-K op and keeps
            # the faster, see Engine._pick_attention)
            scores = (qg.unsqueeze(-2).float() * k.unsqueeze(2).float()).sum(-1) * lv.scaling
        else:
            scores = torch.matmul(qg, k.transpose(-1, -2)) * lv.scaling  # [B, kv, g*T, L]
        if lv.softcap is not None:
            scores = torch.tanh(scores / lv.softcap) * lv.softcap
        key_pos = torch.arange(k.shape[2], device=q.device)
        qp = q_pos[:, :, None]  # [B, T, 1]
        allowed = key_pos[None, None, :] <= qp
        if lv.window is not None:
            allowed = allowed & (key_pos[None, None, :] > qp - lv.window)
        allowed = allowed[:, None, None, :, :].expand(b, 1, g, t, k.shape[2]).reshape(b, 1, g * t, k.shape[2])
        scores = scores.masked_fill(~allowed, float("-inf"))
        if t == 1 and compiling:
            probs = torch.softmax(scores.float(), dim=-1)
            out = (probs.unsqueeze(-1) * v.unsqueeze(2).float()).sum(-2).to(v.dtype)  # [B, kv, g, D]
        else:
            probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out = torch.matmul(probs, v)  # [B, kv, g*T, D]
        return out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)

    def forward(self, tokens, positions, slots, k_cache, v_cache, last=None, kv_len: int | None = None,
                layer=None, head=None):
        """tokens/positions [B, T] (long), slots [B] or None for slots 0..B-1 (decode: cache views, no gather);
        k_cache / v_cache: per layer [slots, kv, L, D], written in place at `positions`.
        `last` [B]: index in T whose logits are returned (None: T-1). `kv_len`: attend only to the first kv_len
        cache positions (prefill; decode uses the whole static cache). `layer` / `head`: compiled versions of
        `self.layer` / `self.head` (the engine compiles one layer's code once and runs it for every layer)."""
        layer, head = layer or self.layer, head or self.head
        x = self.embed(tokens)
        if x.requires_grad:  # a training hook (enable_input_require_grads) marks it even under no_grad
            x = x.detach()
        pos_c = positions.clamp(max=k_cache[0].shape[2] - 1)
        b, t = tokens.shape
        if (t == 1 and slots is None and kv_len is None and self.epilogues and b <= EPILOGUE_MAX_ROWS
                and use_triton(x)):
            x, h = x.reshape(b, -1), None  # the first layer norms its input inside its compiled code
            for i, lv in enumerate(self.layers):
                x, h = layer(lv, x, positions, pos_c, slots, k_cache[i], v_cache[i], kv_len, normed=h, epilogue=True)
            return head(x, last, normed=h)
        for i, lv in enumerate(self.layers):
            x = layer(lv, x, positions, pos_c, slots, k_cache[i], v_cache[i], kv_len)
        return head(x, last)

    def layer(self, lv: LayerView, x, positions, pos_c, slots, kc, vc, kv_len: int | None = None, normed=None,
              epilogue: bool = False):
        """One decoder layer over x [B, T, hidden]; writes this layer's cache kc / vc at pos_c. With `epilogue`
        (decode, x [B, hidden]) it runs `_decode_layer` on `normed`, the layer's input norm of x (None: computed
        here), and returns (x, the next layer's normed input)."""
        if epilogue:
            return self._decode_layer(lv, x, lv.input_norm(x) if normed is None else normed, positions, pos_c, kc, vc)
        b, t = x.shape[:2]
        hd = self.head_dim
        cos_t, sin_t = self.rope[lv.rope_key]
        cos, sin = cos_t[pos_c][:, None], sin_t[pos_c][:, None]  # [B, 1, T, R]
        hidden = lv.input_norm(x)
        q, k, v = lv.qkv.outputs(hidden)
        q = q.view(b, t, -1, hd).transpose(1, 2)
        k = k.view(b, t, -1, hd).transpose(1, 2)
        v = v.view(b, t, -1, hd).transpose(1, 2)
        if lv.q_norm is not None:
            q, k = lv.q_norm(q), lv.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        idx_s = (torch.arange(b, device=x.device) if slots is None else slots)[:, None].expand(b, t)
        kc[idx_s, :, pos_c] = k.transpose(1, 2).to(kc.dtype)
        vc[idx_s, :, pos_c] = v.transpose(1, 2).to(vc.dtype)
        if kv_len is not None:
            kc, vc = kc[:, :, :kv_len], vc[:, :, :kv_len]
        kc, vc = (kc[:b], vc[:b]) if slots is None else (kc[slots], vc[slots])
        a = self.attention(lv, q, kc, vc, positions)
        a = lv.o.outputs(a)[0]
        if lv.pre_ff_norm is not None:
            x = x + lv.post_attn_norm(a)
            m = lv.pre_ff_norm(x)
        else:
            x = x + a
            m = lv.post_attn_norm(x)
        gate, up = lv.gate_up.outputs(m)
        m = lv.down.outputs(lv.act(gate) * up)[0]
        if lv.post_ff_norm is not None:
            m = lv.post_ff_norm(m)
        return x + m

    def _decode_layer(self, lv: LayerView, x, h, positions, pos_c, kc, vc):
        """`layer` for one decode token per row (GPU): x [B, hidden] the residual stream, h its input norm. The
        projections are split-K GEMVs (or cuBLAS) and the work between them four fused kernels
        (kernels/decode_epilogue.py): adapters' up-projection + RoPE + cache write; adapters + residual + norm
        (twice: after o, and after down with the next layer's input norm); adapters + activation."""
        b, ep, hd = x.shape[0], lv.epilogue, self.head_dim
        cos_t, sin_t = self.rope[lv.rope_key]
        y, xa, ad = lv.qkv.raw(h)
        q = qkv_rope_cache(y, xa, ad, cos_t, sin_t, pos_c[:, 0], kc, vc, self.n_heads, self.n_kv, hd)
        a = self.attention(lv, q.view(b, self.n_heads, 1, hd), kc[:b], vc[:b], positions)
        y, xa, ad = lv.o.raw(a.reshape(b, -1))
        norm = ep.post_attn
        x, m = lora_residual_norm(x, y, xa, ad, norm.weight, norm.eps, norm.gemma)
        y, xa, ad = lv.gate_up.raw(m)
        y, xa, ad = lv.down.raw(lora_act_mul(y, xa, ad, lv.gate_up.sizes[0], ep.act, x.dtype))
        norm = ep.next_norm
        return lora_residual_norm(x, y, xa, ad, norm.weight, norm.eps, norm.gemma)

    def head(self, x, last=None, normed=None):
        """Final norm, lm_head and soft-cap of the row `last` (None: the last position) -> float32 logits.
        `normed` [B, hidden]: the final norm of a decode step's x, already computed (by the last epilogue)."""
        if normed is not None:
            x = normed
        elif last is None:
            x = self.final_norm(x[:, -1])
        else:
            x = self.final_norm(x[torch.arange(x.shape[0], device=x.device), last])
        logits = self.lm_head(x)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()
