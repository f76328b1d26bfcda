"""Offloaded gradient checkpointing: `use_gradient_checkpointing="unsloth"`.

Each decoder layer keeps only its input for the backward pass. On CUDA that input is copied to pinned CPU memory on a
side stream while the forward goes on, and brought back on the same side stream one layer ahead of the backward
(while the layer after it recomputes), so the GPU holds at most two layer inputs instead of one per layer. On CPU it
is plain recompute checkpointing. In backward the layer is recomputed under the forward's RNG and autocast state and
differentiated; the gradients are those of standard checkpointing (and of no checkpointing).

Installed per instance through transformers' own hook: every `GradientCheckpointingLayer` calls
`self._gradient_checkpointing_func(partial(forward, self, **kwargs), *args)` when `self.gradient_checkpointing` and
`self.training`; that function is replaced by `offloaded_checkpoint` (transformers drops `use_cache` /
`past_key_values` inside checkpointed layers). Gradients reach the layer's trainable parameters through the
function's inputs (not by a nested `.backward()`), so they flow even when the hidden states do not require grad
(frozen base + LoRA without `enable_input_require_grads`), and `torch.autograd.grad` works too.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from typing import Callable

import torch
from torch import nn

from ..errors import UnsupportedFeatureError
from ..state import base_model_of
from ..utils.memory import available_ram_bytes

logger = logging.getLogger(__name__)


MIN_PIECE = 2 << 20  # pinned pieces are powers of two of at least this many bytes
CHECK_HOST_FROM = 256 << 20  # inputs of at least this many bytes are pinned only while host memory allows
HOST_RESERVE = 4 << 30  # host memory left available after pinning one (bytes)


def pinned_pieces(nbytes: int) -> list[int]:
    """Sizes (powers of two, largest first) whose sum covers nbytes with less than MIN_PIECE to spare. torch's
    pinned-memory allocator rounds every request up to a power of two, so one 3.3 GB layer input (Llama-3.1-8B at
    400k tokens) would take 4.3 GB of host memory, and 32 of them more than the H100 machine's 125 GB."""
    pieces, rest = [], max(int(nbytes), 1)
    while rest > MIN_PIECE:
        top = 1 << (rest.bit_length() - 1)
        pieces.append(top)
        rest -= top
    if rest > 0:  # at most MIN_PIECE left: one more MIN_PIECE, or for a small input alone the power of two over it
        pieces.append(MIN_PIECE if pieces else 1 << (rest - 1).bit_length())
    return pieces


class OffloadState:
    """Per-model bookkeeping: one side stream per CUDA device, the saved inputs not yet used by a backward, in
    forward order (so each backward can start bringing back the input of the layer before it), and the pinned bytes
    held now and at most so far (torch's pinned allocator keeps freed blocks for reuse, so only growth past the most
    ever held takes new host memory)."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.pending: list[weakref.ref] = []
        self.pinned = 0
        self.most_pinned = 0
        self.kept_on_gpu = 0  # inputs kept on the GPU because host memory was short (for the one-time notice)

    def may_pin(self, nbytes: int) -> bool:
        """Whether pinning nbytes more leaves HOST_RESERVE of host memory (always for small inputs, for growth the
        allocator's cache covers, and where the available memory cannot be read)."""
        grow = self.pinned + nbytes - self.most_pinned
        if nbytes < CHECK_HOST_FROM or grow <= 0:
            return True
        available = available_ram_bytes()
        return available is None or available - grow >= HOST_RESERVE

    def hold(self, nbytes: int) -> None:
        self.pinned += nbytes
        self.most_pinned = max(self.most_pinned, self.pinned)

    def release(self, nbytes: int) -> None:
        self.pinned -= nbytes

    def __reduce__(self):  # a copied (or pickled) model gets fresh streams: CUDA streams cannot be copied
        return OffloadState, ()

    def stream(self, device: torch.device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]

    def push(self, saved: "OffloadedInput") -> None:
        self.pending = [ref for ref in self.pending if ref() is not None]
        self.pending.append(weakref.ref(saved))

    def take(self, saved: "OffloadedInput") -> "OffloadedInput | None":
        """Remove `saved` from the pending list; return the input saved just before it (next to be needed)."""
        for i in range(len(self.pending) - 1, -1, -1):
            if self.pending[i]() is saved:
                del self.pending[i]
                return self.pending[i - 1]() if i > 0 else None
        return None


def _byte_slices(flat: torch.Tensor, sizes: list[int]):
    """Consecutive byte slices of a contiguous uint8 tensor, of the given sizes (the last one shorter if it ends)."""
    start = 0
    for size in sizes:
        stop = min(start + size, flat.numel())
        yield flat[start:stop]
        start = stop


class OffloadedInput:
    """A CUDA layer input held in pinned CPU memory (power-of-two pieces, see pinned_pieces): copied out on the side
    stream in forward, copied back on it (`prefetch`), and handed to the compute stream by `load` once the copy is
    done."""

    def __init__(self, x: torch.Tensor, state: OffloadState):
        self.device, self.state = x.device, state
        self.shape, self.dtype = x.shape, x.dtype
        compute, side = torch.cuda.current_stream(x.device), state.stream(x.device)
        x = x.contiguous()
        flat = x.view(-1).view(torch.uint8)
        self.sizes = pinned_pieces(flat.numel())
        self.host = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size in self.sizes]
        self.nbytes = sum(self.sizes)
        state.hold(self.nbytes)
        side.wait_stream(compute)  # x is ready
        with torch.cuda.stream(side):
            for host, part in zip(self.host, _byte_slices(flat, self.sizes)):
                host[:part.numel()].copy_(part, non_blocking=True)
        x.record_stream(side)  # x's memory is not reused before the copy finished
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        state.push(self)

    def prefetch(self) -> None:
        if self.gpu is not None:
            return
        compute, side = torch.cuda.current_stream(self.device), self.state.stream(self.device)
        self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # a compute-stream block
        side.wait_stream(compute)  # ... that queued compute work may still be using: copy after it
        with torch.cuda.stream(side):
            for host, part in zip(self.host, _byte_slices(self.gpu.view(-1).view(torch.uint8), self.sizes)):
                part.copy_(host[:part.numel()], non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)

    def load(self) -> tuple[torch.Tensor, "OffloadedInput | None"]:
        """(this input on the GPU, the input the backward needs next, whose prefetch the caller starts)."""
        following = self.state.take(self)
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        x, self.gpu, self.host = self.gpu, None, None
        self.state.release(self.nbytes)
        return x, following

    def __del__(self):  # a forward whose backward never ran (evaluation under grad, an exception)
        if getattr(self, "host", None) is not None:
            self.state.release(self.nbytes)
            self.host = None


def offload_input(x: torch.Tensor, state: OffloadState) -> "OffloadedInput | None":
    """x copied to pinned host memory, or None when the host cannot hold it (state.may_pin): the layer then keeps
    its input on the GPU (plain checkpointing for that layer; one warning per model)."""
    nbytes = x.numel() * x.element_size()
    if state.may_pin(nbytes):
        return OffloadedInput(x, state)
    if not state.kept_on_gpu:
        logger.warning("fastlm: host memory is short for offloaded checkpointing (%.1f GB more of pinned memory "
                       "would leave under %.0f GB available); layer inputs that do not fit stay on the GPU",
                       nbytes / 1e9, HOST_RESERVE / 2 ** 30)
    state.kept_on_gpu += 1
    return None


def _prefetch_after_mlp_backward(module: nn.Module | None, following: OffloadedInput | None):
    """Start copying the next layer's input back once this layer's MLP backward is done (a hook on the gradient of
    the MLP's input, set when the recompute runs the MLP), so the copy overlaps the attention backward and its
    buffer is not live during the MLP backward, where a layer's backward peaks (the 1B bench's training peak, by
    scripts/gpu_train_memory.py). Without an `mlp` submodule: at once, overlapping the whole recompute. Returns the
    forward pre-hook handle to remove after the recompute (or None)."""
    if following is None:
        return None
    mlp = getattr(module, "mlp", None) if module is not None else None
    if not isinstance(mlp, nn.Module):
        following.prefetch()
        return None

    def on_forward(_mod, args):
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if x is not None and x.requires_grad:
            x.register_hook(lambda grad: following.prefetch())
        else:
            following.prefetch()

    return mlp.register_forward_pre_hook(on_forward)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in kinds]


class _Call:
    """What the recompute needs besides tensors: the layer call, where each flat input goes, RNG and autocast."""

    def __init__(self, function: functools.partial, n_args: int, grad_kwargs: list[str], state: OffloadState,
                 module: nn.Module | None = None):
        self.function, self.n_args, self.grad_kwargs, self.state = function, n_args, grad_kwargs, state
        self.module = module

    def run(self, args, grad_kw_values):
        kwargs = dict(self.function.keywords)
        kwargs.update(zip(self.grad_kwargs, grad_kw_values))
        return self.function.func(*self.function.args, *args, **kwargs)


class OffloadedCheckpointFunction(torch.autograd.Function):
    """forward(call, *flat): flat = the layer's positional args, its kwargs tensors that require grad, then its
    trainable parameters. Runs the layer without building a graph and keeps only the inputs (the first positional
    CUDA tensor in pinned CPU memory); backward recomputes and differentiates with `torch.autograd.grad`."""

    @staticmethod
    def forward(ctx, call: _Call, *flat):
        n_in = call.n_args + len(call.grad_kwargs)
        inputs = flat[:n_in]
        ctx.call, ctx.n_in, ctx.n_params = call, n_in, len(flat) - n_in
        ctx.input_requires_grad = [torch.is_tensor(t) and t.requires_grad for t in inputs]
        ctx.autocast = _autocast_state()
        ctx.cuda_devices = sorted({t.device.index for t in inputs if torch.is_tensor(t) and t.is_cuda})
        ctx.rng_cpu = torch.get_rng_state()
        ctx.rng_cuda = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        cuda_input = call.n_args > 0 and torch.is_tensor(inputs[0]) and inputs[0].is_cuda
        ctx.offloaded = offload_input(inputs[0], call.state) if cuda_input else None
        offload = ctx.offloaded is not None
        ctx.non_tensors = {i: t for i, t in enumerate(inputs) if not torch.is_tensor(t)}
        ctx.save_for_backward(*[None if (offload and i == 0) or not torch.is_tensor(t) else t
                                for i, t in enumerate(inputs)], *flat[n_in:])
        with torch.no_grad():
            return call.run(inputs[:call.n_args], inputs[call.n_args:])

    @staticmethod
    def backward(ctx, *grad_outputs):
        call = ctx.call
        saved = ctx.saved_tensors
        inputs = list(saved[:ctx.n_in])
        params = saved[ctx.n_in:]
        hook, following = None, None
        if ctx.offloaded is not None:
            inputs[0], following = ctx.offloaded.load()
            ctx.offloaded = None
            hook = _prefetch_after_mlp_backward(call.module, following)
        for i, value in ctx.non_tensors.items():
            inputs[i] = value
        detached = [t.detach().requires_grad_(req) if torch.is_tensor(t) else t
                    for t, req in zip(inputs, ctx.input_requires_grad)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=ctx.cuda_devices))
            torch.set_rng_state(ctx.rng_cpu)
            for device, state in zip(ctx.cuda_devices, ctx.rng_cuda):
                torch.cuda.set_rng_state(state, device)
            for kind, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device_type=kind, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            try:
                outputs = call.run(detached[:call.n_args], detached[call.n_args:])
            finally:
                if hook is not None:
                    hook.remove()
        outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
                 if torch.is_tensor(out) and out.requires_grad and grad is not None]
        wanted = [t for t in detached if torch.is_tensor(t) and t.requires_grad] + list(params)
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
            if pairs and wanted else [None] * len(wanted)
        if following is not None:
            following.prefetch()  # no-op when the hook started it; else (no grad reached the MLP input) now
        grads = iter(grads)
        input_grads = [next(grads) if torch.is_tensor(t) and t.requires_grad else None for t in detached]
        return (None, *input_grads, *grads)


def offloaded_checkpoint(function, *args, state: OffloadState):
    """transformers' checkpoint-function signature: `function` is `partial(layer_forward, layer, **kwargs)`
    (transformers >= 5.2x) or `partial(layer.__call__, **kwargs)` (a bound method of the layer, 5.17)."""
    module = None
    if isinstance(function, functools.partial):
        if len(function.args) == 1:
            module = function.args[0]
        elif not function.args:
            module = getattr(function.func, "__self__", None)
    if not isinstance(module, nn.Module):
        raise UnsupportedFeatureError(
            "offloaded gradient checkpointing expects transformers' layer call partial(forward, layer, **kwargs), "
            f"got {function!r}. Fix: use use_gradient_checkpointing=True for this model.")
    grad_kwargs = [k for k, v in function.keywords.items() if torch.is_tensor(v) and v.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    needs_grad = any(torch.is_tensor(a) and a.requires_grad for a in args) or grad_kwargs or params
    if not torch.is_grad_enabled() or not needs_grad:
        return function(*args)
    call = _Call(function, len(args), grad_kwargs, state, module)
    return OffloadedCheckpointFunction.apply(call, *args, *[function.keywords[k] for k in grad_kwargs], *params)


def _decoder_layers(model) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class _Unset:
    """'No instance attribute': one object, also in deep copies and pickles."""

    def __reduce__(self):
        return "_UNSET"


_UNSET = _Unset()
_RECORD_ATTR = "_fastlm_offload"  # on the transformers model: the OffloadInstall in force
PATCH_NAME = "offloaded_checkpointing"  # its entry in the model's PatchSet, so `fastlm.patch.remove` takes it off


def _set_attr(obj, name: str, value) -> None:
    if value is _UNSET:
        obj.__dict__.pop(name, None)
    else:
        object.__setattr__(obj, name, value)


class KeepOffloadedOnEnable:
    """A transformers model's instance `_set_gradient_checkpointing` while offloaded checkpointing is installed.

    Every way transformers turns checkpointing on or off (`gradient_checkpointing_enable` / `_disable`, and the
    `activation_checkpointing_*` names of transformers >= 5.2x, whichever object PEFT forwards them from) ends in
    `self._set_gradient_checkpointing(enable=..., gradient_checkpointing_func=...)`, which puts its plain
    `torch.utils.checkpoint` partial on every layer. This runs that method unchanged, then, when it enabled, puts the
    offloaded function back on this model's layers; disabling stays plain disabling. TRL toggles checkpointing
    around every generation step, so without it the offloaded mode would be gone after the first one.
    Held as attributes (not a closure), so a deep copy of the model gets one bound to the copy."""

    def __init__(self, module: nn.Module, install: "OffloadInstall", previous):
        self.module, self.install, self.previous = module, install, previous

    def __call__(self, *args, **kwargs):
        inner = self.previous if self.previous is not _UNSET else \
            type(self.module)._set_gradient_checkpointing.__get__(self.module)
        result = inner(*args, **kwargs)
        if kwargs.get("enable", args[0] if args else True):
            self.install.put_back(self.module)
        return result


class OffloadInstall:
    """What one `install_offloaded_checkpointing` changed, kept on the transformers model (`owner`)."""

    def __init__(self, owner: nn.Module, layers: list[nn.Module], func: Callable):
        self.owner, self.layers, self.func = owner, layers, func
        self.previous = [(layer, layer.__dict__.get("gradient_checkpointing", _UNSET),
                          layer.__dict__.get("_gradient_checkpointing_func", _UNSET)) for layer in layers]
        self.hooks: list[tuple[nn.Module, object]] = []
        self.old_cache: list = []

    def put_back(self, within: nn.Module) -> None:
        """The offloaded function on the layers under `within` (transformers just set its own there)."""
        under = {id(m) for m in within.modules()}
        for layer in self.layers:
            if id(layer) in under:
                layer._gradient_checkpointing_func = self.func

    def hook(self, model: nn.Module) -> None:
        from transformers import PreTrainedModel

        for module in model.modules():
            method = getattr(type(module), "_set_gradient_checkpointing", None)
            if not isinstance(module, PreTrainedModel) or method is None \
                    or "value" in inspect.signature(method).parameters:  # pre-4.35 remote code: nothing to keep
                continue
            previous = module.__dict__.get("_set_gradient_checkpointing", _UNSET)
            self.hooks.append((module, previous))
            object.__setattr__(module, "_set_gradient_checkpointing", KeepOffloadedOnEnable(module, self, previous))

    def undo(self) -> None:
        """Give back transformers' checkpointing: layers still on the offloaded function get their earlier function
        and flag back; layers that were disabled since stay disabled."""
        if self.owner.__dict__.get(_RECORD_ATTR) is not self:
            return  # already undone (or replaced by a later install, which undid this one)
        for module, previous in reversed(self.hooks):
            _set_attr(module, "_set_gradient_checkpointing", previous)
        for layer, flag, old_func in self.previous:
            if layer.__dict__.get("_gradient_checkpointing_func") is self.func:
                _set_attr(layer, "_gradient_checkpointing_func", old_func)
                if layer.gradient_checkpointing:
                    _set_attr(layer, "gradient_checkpointing", flag)
        for config, value in self.old_cache:
            config.use_cache = value
        self.owner.__dict__.pop(_RECORD_ATTR, None)

    def remove(self) -> None:
        """`undo`, and its entry out of the model's PatchSet."""
        self.undo()
        from . import patch_set

        ps = patch_set(self.owner)
        if ps is not None:
            ps.installed[:] = [(name, undo) for name, undo in ps.installed if undo != self.undo]


def install_offloaded_checkpointing(model) -> Callable[[], None]:
    """Checkpoint every decoder layer of `model` (a transformers or PEFT model) with offloaded inputs, and turn
    `use_cache` off. Returns `undo()`, which gives back the layers' previous checkpointing settings and `use_cache`
    (also reachable as `remove_offloaded_checkpointing(model)` and, when the model carries a fastlm PatchSet, as
    `fastlm.patch.remove(model)`). Installing again first undoes the earlier install.

    While installed, transformers' `gradient_checkpointing_enable` / `activation_checkpointing_enable` (on this
    model or its PEFT wrapper, any kwargs) keep the offloaded function and `_disable` disables
    (`KeepOffloadedOnEnable`). Call it after transformers' enable, which turns the layers' checkpointing on."""
    remove_offloaded_checkpointing(model)
    layers = _decoder_layers(model)
    if not layers:
        raise UnsupportedFeatureError(
            f"{type(model).__name__} has no transformers GradientCheckpointingLayer, so its layers cannot be "
            "checkpointed with offloading. Fix: use use_gradient_checkpointing=True (plain checkpointing).")
    owner = base_model_of(model)
    install = OffloadInstall(owner, layers, functools.partial(offloaded_checkpoint, state=OffloadState()))
    configs = [c for c in {id(m.config): m.config for m in model.modules()
                           if getattr(m, "config", None) is not None and hasattr(m.config, "use_cache")}.values()]
    install.old_cache = [(c, c.use_cache) for c in configs]
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = install.func
    for config in configs:
        config.use_cache = False
    install.hook(owner)
    owner.__dict__[_RECORD_ATTR] = install
    from . import patch_set

    ps = patch_set(owner)
    if ps is not None:
        ps.installed.append((PATCH_NAME, install.undo))
    return install.remove


def is_offloaded_checkpointing(model) -> bool:
    return _RECORD_ATTR in base_model_of(model).__dict__


def remove_offloaded_checkpointing(model) -> bool:
    """Undo `install_offloaded_checkpointing` on this model if it is installed. Returns whether it was."""
    install = base_model_of(model).__dict__.get(_RECORD_ATTR)
    if install is None:
        return False
    install.remove()
    return True
