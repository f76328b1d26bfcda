"""The decoder math of the engine: one place for every registered family's per-layer forward.

`DecoderView(model)` reads the HF model's own modules (embedding, each layer's projections, norms, MLP, final norm,
lm_head) and computes a forward over a static KV cache:

    forward(tokens [B, T], positions [B, T], slots [B], cache, last [B]) -> logits [B, V]

Family details honoured (read from the HF modules and config, never guessed): GQA, q/k-norm (Qwen3, Gemma 3),
Gemma's (1 + w) norms and sandwich norms (by calling the HF norm modules), the embedding scale (Gemma's scaled
embedding modules), `attn.scaling` (query_pre_attn_scalar), attention and final logit soft-caps, per-layer sliding
windows, per-layer-type RoPE tables (Gemma 3) and partial rotary (Phi-3), q/k/v biases (Qwen2).

Projections are `Projection` objects (projection.py): the HF modules called as they are, or with `fuse=True` one
concatenated weight per group with the adapters unmerged. GPU decode of a few rows runs `_decode_layer`: the
projections' GEMVs with three fused epilogue kernels between them (kernels/decode_epilogue.py).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels._triton import use_triton
from ..kernels.decode_attention import decode_attention
from ..kernels.decode_epilogue import lora_act_mul, lora_residual_norm, qkv_rope_cache
from ..kernels.reference import rotate_half
from .projection import Projection


# decode batches up to this size run the fused epilogue kernels (each row program re-reads the adapters' B)
EPILOGUE_MAX_ROWS = 4
ROW_SPLITS = 4  # split-K partial sums the residual-norm epilogue (one program per row) may add
# the compiled decode step's attention: "sum" (products and sums, measured on the H100), "kernel" (the Triton
# decode-attention custom op) or "auto" (the engine captures each batch bucket both ways on the GPU and keeps the
# faster replay; scripts/gpu_engine_profile.py compares them)
COMPILED_DECODE_ATTENTION = "auto"


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
        projections are split-K GEMVs (or cuBLAS) and the work between them three fused kernels, four launches
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
