"""Fused LoRA forwards on one PEFT model instance (kernels/lora.py), removable again.

`install_fast_lora(model)` swaps, on this instance only:
- the forward of every decoder MLP (gate_proj/up_proj/down_proj + act_fn, or Phi-3's gate_up_proj/down_proj +
  activation_fn) for `LoRAMLPFunction` (SwiGLU / GeGLU in one autograd Function);
- the forward of every other PEFT LoRA linear (q/k/v/o and any other target) for `LoRALinearFunction`.
`lora_qkv(attn, hidden_states)` and `lora_o(attn, x)` are the entry points for a patched attention forward: q, k
and v in one `LoRAQKVFunction` (one input saved, one stacked X·Aᵀ).

Every fused call first checks that fusion reproduces PEFT's LoRA forward: one active vanilla LoRA adapter
(no DoRA or other variant, no lora_bias), lora_dropout == 0, not merged, adapters enabled, no fan_in_fan_out, and a
frozen base `nn.Linear` or bitsandbytes `Linear4bit` whose bias (if any) is frozen too (bias="none"). Otherwise it
runs the module's own forward (exactly PEFT) and says why once per model. Parameters, module tree and state_dict
are untouched, so saving and loading adapters is unchanged. `undo()` restores every swapped forward.

Fusion is for training: while autograd records nothing (generation, evaluation under no_grad/inference_mode) the
modules' own forwards run, so 4-bit models keep bitsandbytes' inference kernels, which read the packed weight
directly instead of dequantizing it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..kernels.lora import Adapter, BaseWeight, fused_lora_linear, fused_lora_mlp, fused_lora_qkv
from ..kernels.lora_reference import activation_reference
from .patchset import bind_forward, is_bound_forward

logger = logging.getLogger(__name__)

ACTIVATION_KINDS = ("silu", "gelu", "gelu_tanh")
_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
_PHI3_MLP_NAMES = ("gate_up_proj", "down_proj")


class Notices:
    """Each distinct reason for not fusing is logged once per installed model."""

    def __init__(self):
        self.said: set[str] = set()

    def fallback(self, where: str, reason: str) -> None:
        if reason not in self.said:
            self.said.add(reason)
            logger.warning("fastlm: fused LoRA not used for %s (%s); they run PEFT's own forward", where, reason)


_GLOBAL_NOTICES = Notices()


def _is_lora_layer(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def _is_lora_linear(module) -> bool:
    """A PEFT LoRA layer over a linear (bitsandbytes' 4/8-bit linears are nn.Linear subclasses); not embeddings
    or convolutions, which keep PEFT's forward without a notice."""
    return _is_lora_layer(module) and isinstance(module.get_base_layer(), nn.Linear)


def _base_weight(base) -> BaseWeight | str:
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return "the base bias is trained (bias='all' or 'lora_only'); fusion needs bias='none'"
    weight = base.weight
    if weight.requires_grad:
        return "the base weight is trained"
    state = getattr(weight, "quant_state", None)
    if state is None:  # bitsandbytes may keep it on the module only (it restores it there in forward)
        state = getattr(base, "quant_state", None)
    kind = type(base).__name__
    if state is not None and "4bit" in kind:
        if getattr(state, "packing_format_for_cpu", False):
            return "its 4-bit weight is in bitsandbytes' CPU inference layout (see fastlm.patch.bnb_cpu)"
        return BaseWeight(weight, state, bias)
    if "forward" in base.__dict__:  # another patch (e.g. the FP8 backward) owns this layer's computation
        return f"its base {kind} has a patched forward"
    if type(weight) not in (nn.Parameter, torch.Tensor):
        return f"its base weight is a {type(weight).__name__} (quantized tensor subclass)"
    if type(base) is nn.Linear and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return BaseWeight(weight, None, bias)
    return f"base layer {kind} with {weight.dtype} weights is not nn.Linear or bitsandbytes Linear4bit"


def lora_parts(layer) -> tuple[BaseWeight, Adapter] | str:
    """(base, adapter) of a PEFT LoRA linear when the fused path computes what its forward does, else the reason."""
    if not _is_lora_layer(layer):
        return f"{type(layer).__name__} is not a PEFT LoRA layer"
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "the adapters are merged into the base weights"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters ({active}); fusion needs exactly one"
    name = active[0]
    if name not in layer.lora_A:
        return f"the active adapter {name!r} has no LoRA weights on this layer"
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return "DoRA (or another LoRA variant) is used"
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return "lora_dropout > 0; fusion needs lora_dropout=0"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    A, B = layer.lora_A[name], layer.lora_B[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear:
        return f"the adapter is {type(A).__name__}/{type(B).__name__}, not nn.Linear"
    if B.bias is not None or A.bias is not None:
        return "lora_bias=True"
    base = _base_weight(layer.get_base_layer())
    if isinstance(base, str):
        return base
    return base, Adapter(A.weight, B.weight, float(layer.scaling[name]))


def activation_kind(act_fn) -> str | None:
    """Which of silu / gelu (erf) / gelu_tanh this activation module computes, probed numerically; None if
    none of them."""
    probe = torch.linspace(-8, 8, 321)
    try:
        with torch.no_grad():
            got = act_fn(probe)
    except Exception:  # noqa: BLE001 - any activation that cannot run on a CPU probe is simply not fused
        return None
    for kind in ACTIVATION_KINDS:
        if torch.allclose(got, activation_reference(probe, kind), rtol=1e-5, atol=1e-6):
            return kind
    return None


def _parts_or_reason(modules):
    parts = []
    for m in modules:
        p = lora_parts(m)
        if isinstance(p, str):
            return p
        parts.append(p)
    return parts


def lora_qkv(attn, hidden_states: torch.Tensor):
    """(q, k, v) projections of an attention module, shaped (..., out) as q_proj(hidden_states) etc. would be:
    one fused LoRAQKVFunction when all three are fusable LoRA layers, else `lora_linear` on each. Phi-3's
    qkv_proj is one projection split into q, k, v."""
    notices = getattr(attn, "_fastlm_lora_notices", _GLOBAL_NOTICES)
    if hasattr(attn, "qkv_proj"):
        qkv = lora_linear(attn.qkv_proj, hidden_states, notices, "qkv_proj")
        q_size = attn.config.num_attention_heads * attn.head_dim
        kv_size = attn.config.num_key_value_heads * attn.head_dim
        return qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not torch.is_grad_enabled():
        return tuple(m(hidden_states) for m in mods)
    parts = _parts_or_reason(mods)
    if isinstance(parts, str):  # e.g. LoRA on q and v only: each one fused on its own where it can be
        return tuple(lora_linear(m, hidden_states, notices, n) for m, n in zip(mods, ("q_proj", "k_proj", "v_proj")))
    return fused_lora_qkv(hidden_states, [p[0] for p in parts], [p[1] for p in parts])


def lora_o(attn, x: torch.Tensor) -> torch.Tensor:
    """o_proj(x), fused when o_proj is a fusable LoRA layer."""
    return lora_linear(attn.o_proj, x, getattr(attn, "_fastlm_lora_notices", _GLOBAL_NOTICES), "o_proj")


def lora_linear(layer, x: torch.Tensor, notices: Notices = _GLOBAL_NOTICES, where: str = "a LoRA layer"):
    """layer(x), through LoRALinearFunction when it is a fusable LoRA layer and autograd is recording."""
    if not torch.is_grad_enabled():
        return layer(x)
    parts = lora_parts(layer)
    if isinstance(parts, str):
        if _is_lora_layer(layer):
            notices.fallback(where, parts)
        return layer(x)
    return fused_lora_linear(x, *parts)


# ------------------------------------------------------------------------------------------- installation
_SLOT = "_fastlm_lora_forward"


@dataclass
class SwapState:
    """One swapped forward's state on its module: the forward it replaced (bound to the module), the MLP kind
    (silu / gelu / gelu_tanh / phi3; None for a single linear), and where fallbacks are told. Once undone
    (`active` False) the swapped forward delegates to the replaced one, so a wrapper installed on top of it later
    (e.g. tiled MLP) still computes the original function."""

    inner: Callable
    kind: str | None
    notices: Notices
    where: str
    active: bool = True


def fused_linear_forward(self, x, *args, **kwargs):
    """A PEFT LoRA linear's forward, bound to the layer: LoRALinearFunction while autograd records."""
    state = getattr(self, _SLOT)
    if not state.active or args or kwargs or not torch.is_grad_enabled():
        return state.inner(x, *args, **kwargs)
    parts = lora_parts(self)
    if isinstance(parts, str):
        state.notices.fallback(state.where, parts)
        return state.inner(x)
    return fused_lora_linear(x, *parts)


def fused_mlp_forward(self, x, *args, **kwargs):
    """A gated MLP's forward whose projections are all LoRA linears, bound to the MLP: LoRAMLPFunction (Phi-3:
    the fused gate_up projection split, activated, projected down) while autograd records."""
    state = getattr(self, _SLOT)
    if not state.active or args or kwargs or not torch.is_grad_enabled():
        return state.inner(x, *args, **kwargs)
    if state.kind == "phi3":
        parts = _parts_or_reason((self.gate_up_proj, self.down_proj))
        if isinstance(parts, str):
            state.notices.fallback(state.where, parts)
            return state.inner(x)
        gate, up = fused_lora_linear(x, *parts[0]).chunk(2, dim=-1)
        return fused_lora_linear(up * self.activation_fn(gate), *parts[1])
    parts = _parts_or_reason((self.gate_proj, self.up_proj, self.down_proj))
    if isinstance(parts, str):
        state.notices.fallback(state.where, parts)
        return state.inner(x)
    return fused_lora_mlp(x, *(p[0] for p in parts), tuple(p[1] for p in parts), state.kind)


class Swap:
    """Installs one fused forward (bound to the module, state in `module._fastlm_lora_forward`) and undoes it:
    the plain forward comes back when ours is still on top; under someone else's wrapper ours stays, inactive."""

    def __init__(self, module, forward, state: SwapState):
        self.module, self.forward, self.state = module, forward, state
        self.restore = bind_forward(module, forward, _SLOT, state)

    def undo(self) -> None:
        self.state.active = False
        if is_bound_forward(self.module, self.forward):
            self.restore()


def _mlp_kind(module) -> str | None:
    if all(isinstance(getattr(module, n, None), nn.Module) for n in _MLP_NAMES) and hasattr(module, "act_fn"):
        return activation_kind(module.act_fn)
    if all(isinstance(getattr(module, n, None), nn.Module) for n in _PHI3_MLP_NAMES) and \
            hasattr(module, "activation_fn"):
        return "phi3"
    return None


def install_fast_lora(model, linears: bool = True):
    """Install the fused LoRA forwards on this PEFT model instance. Returns `undo()`, which restores every
    swapped forward (afterwards the model computes exactly what plain PEFT computes).

    linears: also fuse LoRA linears outside the MLPs (q/k/v/o, …) one by one; a patched attention forward can
    instead call `lora_qkv` / `lora_o` for q, k and v in one function.
    """
    if not isinstance(linears, bool):
        raise TypeError(f"linears={linears!r}: True or False. Fix: pass linears=True (default) or False")
    installed = getattr(model, "_fastlm_fast_lora_undo", None)
    if installed is not None:  # installing twice would wrap the fused forwards in themselves
        return installed
    notices = Notices()
    swaps: list[Swap] = []
    in_mlp: set[int] = set()
    mlp_count = 0
    for name, module in model.named_modules():
        if isinstance(getattr(module, "q_proj", None), nn.Module) or \
                isinstance(getattr(module, "qkv_proj", None), nn.Module):
            module._fastlm_lora_notices = notices
        kind = _mlp_kind(module)
        if kind is None:
            if any(isinstance(getattr(module, n, None), nn.Module) for n in _MLP_NAMES) and hasattr(module, "act_fn"):
                notices.fallback(f"{type(module).__name__} MLPs", "their activation is not silu, gelu or gelu_tanh")
            continue
        lora_children = [getattr(module, n) for n in (_PHI3_MLP_NAMES if kind == "phi3" else _MLP_NAMES)]
        if not all(_is_lora_linear(c) for c in lora_children):
            continue  # LoRA on some of its projections only: those are fused one by one below
        if _SLOT in module.__dict__:
            continue  # an undone fused forward still under another wrapper: it runs PEFT's forward
        where = f"{type(module).__name__} MLPs"
        swaps.append(Swap(module, fused_mlp_forward, SwapState(module.forward, kind, notices, where)))
        in_mlp.update(id(c) for c in lora_children)
        mlp_count += 1
    lin_count = 0
    if linears:
        for name, module in model.named_modules():
            if _is_lora_linear(module) and id(module) not in in_mlp and _SLOT not in module.__dict__:
                where = f"LoRA layers {name.rsplit('.', 1)[-1]}"
                swaps.append(Swap(module, fused_linear_forward, SwapState(module.forward, None, notices, where)))
                lin_count += 1
    # say at once why the LoRA layers that cannot be fused fall back (run-time reasons are said when they occur)
    for name, module in model.named_modules():
        if _is_lora_linear(module):
            parts = lora_parts(module)
            if isinstance(parts, str):
                notices.fallback(f"LoRA layers {name.rsplit('.', 1)[-1]}", parts)
    logger.debug("fastlm: fused LoRA on %d MLPs and %d other LoRA linears", mlp_count, lin_count)

    undo = FastLoRA(model, swaps, mlp_count, lin_count, notices)
    model._fastlm_fast_lora_undo = undo
    return undo


class FastLoRA:
    """The undo of `install_fast_lora` (call it), with what was installed: `mlp_count`, `linear_count` and the
    `notices` given. A plain object holding the model and its swaps, so a deep copy of the model gets its own."""

    def __init__(self, model, swaps: list[Swap], mlp_count: int, linear_count: int, notices: Notices):
        self.model, self.swaps, self.notices = model, swaps, notices
        self.mlp_count, self.linear_count = mlp_count, linear_count

    def __call__(self) -> None:
        for swap in reversed(self.swaps):
            swap.undo()
        for module in self.model.modules():
            if "_fastlm_lora_notices" in module.__dict__:
                del module._fastlm_lora_notices
        self.swaps.clear()
        self.model.__dict__.pop("_fastlm_fast_lora_undo", None)
