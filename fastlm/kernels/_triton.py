"""Shared Triton plumbing for the kernel modules: availability, dispatch, launch sizes.

Dispatch rule of every op: CUDA tensors run the Triton kernel, anything else runs the pure-torch reference in
`kernels/reference.py`. Tests force the Triton path on CPU tensors with `force_triton()`, which needs the Triton
interpreter (`TRITON_INTERPRET=1` set before the kernel modules are imported).

Triton is optional: without it the kernel modules still import (their `@jit` kernels become stubs that raise
`MissingDependencyError` when launched) and every op runs its reference.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from ..errors import ConfigError, MissingDependencyError, Problem, UnsupportedFeatureError

try:  # pragma: no cover - exercised by whichever branch the machine has
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    HAS_TRITON = False

    class _LanguageStub:
        """Stands in for triton.language so kernel signatures (`BLOCK: tl.constexpr`) still evaluate."""

        constexpr = object
        float32 = float16 = bfloat16 = int32 = int64 = None

    tl = _LanguageStub()

_FORCE = {"on": os.environ.get("FASTLM_FORCE_TRITON", "") == "1"}


def jit(fn):
    """`triton.jit`, or a stub that explains the missing package when the kernel is launched."""
    if HAS_TRITON:
        return triton.jit(fn)

    class _Missing:
        def __getitem__(self, grid):
            raise MissingDependencyError("triton", f"the Triton kernel {fn.__name__}", "pip install triton")

    return _Missing()


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@contextlib.contextmanager
def force_triton(on: bool = True) -> Iterator[None]:
    """Run the Triton kernels on CPU tensors too (tests). Needs TRITON_INTERPRET=1 before kernels are imported."""
    old = _FORCE["on"]
    _FORCE["on"] = on
    try:
        yield
    finally:
        _FORCE["on"] = old


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel: all tensors on CUDA, or forced under the interpreter."""
    if _FORCE["on"]:
        if not HAS_TRITON:
            raise MissingDependencyError("triton", "force_triton()", 'pip install "fastlm[test]"')
        if not interpreter_on() and not all(t.is_cuda for t in tensors):
            raise UnsupportedFeatureError(
                "force_triton() got CPU tensors but TRITON_INTERPRET is not '1'. Fix: set TRITON_INTERPRET=1 in the "
                "environment before fastlm.kernels modules are imported, or pass CUDA tensors.")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device for a launch (Triton launches on the current device; with a model split over
    GPUs, a layer's tensors may live on another one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------- programmatic dependent launch (Hopper and later)
# A kernel launched with PDL may start while the previous kernel in the stream is still finishing: it does the work
# that depends on no other kernel first (a GEMV issues its weight loads), then `pdl_wait` (griddepcontrol.wait:
# blocks until the previous kernel has completed and its writes are visible) before it reads anything another kernel
# writes (activations, partial sums, the KV cache, positions, tables computed in the step) and before its first
# store (its output buffer may be memory the previous kernel still reads). Every program of such a kernel reaches
# pdl_wait (none returns early), so completion stays transitive down a chain of them. With PDL_TRIGGER, pdl_wait
# also signals the next kernel that it may launch (griddepcontrol.launch_dependents); otherwise the next kernel
# launches as this one's programs exit. Because the trigger comes after the wait, by the time the next kernel starts
# everything but the immediately preceding kernel has completed. CUDA-graph capture keeps these edges.
PDL = True  # module switch, read at every launch; FASTLM_PDL=0 in the environment turns PDL off too
PDL_TRIGGER = True
_PDL_ON, _PDL_OFF = ("", "1", "true", "on", "yes"), ("0", "false", "off", "no")


def _pdl_env() -> bool:
    value = os.environ.get("FASTLM_PDL", "")
    if value.strip().lower() in _PDL_ON:
        return True
    if value.strip().lower() in _PDL_OFF:
        return False
    raise ConfigError("fastlm kernels", [Problem(
        "FASTLM_PDL", value, "one of 1/true/on/yes (the default: programmatic dependent launch on Hopper and later "
        "GPUs) or 0/false/off/no", "unset FASTLM_PDL, or set FASTLM_PDL=0 to launch every kernel without PDL")])


@functools.lru_cache(maxsize=8)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=1)
def triton_has_pdl() -> bool:
    """Whether the installed Triton launches with PDL: `launch_pdl` and tl.extra.cuda.gdc_wait, which the 3.4 line
    has (torch >= 2.4 may bring an older Triton: its kernels then launch without PDL)."""
    import re

    try:
        import triton
        from triton.language.extra import cuda as tl_cuda
    except Exception:  # noqa: BLE001 - no Triton, or a build without the CUDA extras
        return False
    version = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
    return version >= (3, 4) and hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")


def pdl_mode(device: torch.device) -> int:
    """The USE_PDL constexpr of a launch on `device`: 0 without PDL (off by `PDL` or FASTLM_PDL=0, CPU tensors, the
    interpreter, GPUs before compute capability 9.0, a Triton older than 3.4), 1 with PDL and the early trigger, 2
    with PDL and no trigger."""
    if not PDL or not HAS_TRITON or device.type != "cuda" or interpreter_on() or not _pdl_env():
        return 0
    if not triton_has_pdl():
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _capability(index) < (9, 0):
        return 0
    return 1 if PDL_TRIGGER else 2


def pdl_launch(mode: int) -> dict:
    """The launch keywords of a kernel whose USE_PDL is `mode` (from pdl_mode)."""
    return {"launch_pdl": True} if mode else {}


@jit
def pdl_wait(USE_PDL: tl.constexpr):
    """griddepcontrol.wait (then launch_dependents where USE_PDL is 1); nothing where USE_PDL is 0."""
    if USE_PDL != 0:
        tl.extra.cuda.gdc_wait()
        if USE_PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_count(device: torch.device, n_rows: int, per_sm: int = 4) -> int:
    """How many persistent programs to launch for `n_rows` rows (a few per SM on CUDA, few under the interpreter)."""
    if device.type == "cuda":
        return max(1, min(n_rows, _sm_count(device.index or 0) * per_sm))
    return max(1, min(n_rows, 2))


def num_warps_for(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) with a unit last stride (copies only when the layout needs it)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def register_opaque_op(name: str, impl, fake, mutates: tuple[str, ...] = ()) -> None:
    """Register `fastlm::<name>` once per process: a custom op that torch.compile calls as it is (the launch eager
    mode makes) instead of re-compiling its Triton kernel inside inductor's graph. `impl` is a module-level function
    whose annotations give the op's schema and which looks its launcher up in its module at call time, so a kernel
    module reloaded under the interpreter (the tests) is served by the op registered first; `fake` gives the output
    shape to the compiler; `mutates` names the arguments the op writes in place."""
    if hasattr(torch.ops.fastlm, name):
        return
    torch.library.custom_op(f"fastlm::{name}", mutates_args=tuple(mutates))(impl).register_fake(fake)


def graph_replay_ms(graph, reps: int) -> float:
    """Mean milliseconds of one replay of a captured CUDA graph (one untimed replay first)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def launches_ms(fn, launches: int = 20, reps: int = 3, warm: int = 1) -> float:
    """Milliseconds of `launches` calls of fn captured in one CUDA graph (kernel time without launch overhead);
    fn runs `warm` times eagerly first (compiles its kernels)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return graph_replay_ms(graph, reps)
