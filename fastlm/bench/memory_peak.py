"""What holds the GPU memory at the peak of one training step, from a CUDA caching-allocator snapshot.

`torch.cuda.memory._record_memory_history()` makes `torch.cuda.memory._snapshot()` return (torch 2.1 .. 2.13 at
least; older or newer keys are read defensively):

    {"segments": [{"device", "address", "blocks": [{"address"?, "size", "requested_size", "state", "frames"}]}],
     "device_traces": [[{"action", "addr", "size", "frames"}, ...] per device]}

Block `size` is what `torch.cuda.memory_allocated` counts; a trace entry's `size` is the *requested* size (the block
holds it rounded up to 512 bytes, sometimes more). The allocator's `allocated_bytes` drop when a block is freed
("free_requested"), not when another stream is done with it ("free_completed"). Frames are innermost first.

`analyse_step(before, trace, ...)` replays one step: the live blocks of a snapshot taken just before it, then the
trace entries between two marker allocations (odd uint8 sizes, `marker_size(step, phase)`), and returns the moment
of the peak, the live memory at that moment grouped by allocation site, and the events around it. Pure Python, so it
is tested on synthetic snapshots without a GPU; scripts/gpu_train_memory.py records the real one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

MB = 2 ** 20
MARKER_BASE = 999_983  # odd byte counts below 1 MiB: no real bf16/fp32 tensor asks for them
PHASES = ("start", "forward", "backward", "optimizer")  # markers: a step starts; its forward/backward/... ended
MAX_MARKED_STEPS = 1000
# the part of a step in progress after each marker
_IN_PROGRESS = {"start": "forward", "forward": "backward", "backward": "optimizer step", "optimizer": "after the step"}
_LIBRARIES = ("fastlm/", "transformers/", "peft/", "torch/", "triton/", "trl/", "bitsandbytes/")
# frames that only forward a call (module __call__, decorators, autograd plumbing): never the allocation site
_PLUMBING = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "torch/autograd/function.py",
             "torch/_tensor.py", "torch/autograd/__init__.py", "torch/autograd/graph.py",
             "torch/amp/autocast_mode.py", "torch/_compile.py", "torch/_dynamo/", "torch/_ops.py",
             "torch/optim/optimizer.py", "torch/utils/_device.py", "torch/overrides.py", "functools.py",
             "contextlib.py", "<frozen", "peft/tuners/tuners_utils.py", "transformers/utils/generic.py",
             "transformers/modeling_layers.py", "transformers/utils/deprecation.py")
_DRIVERS = ("fastlm/bench/", "gpu_train_memory.py")  # the training loop itself: the outermost context, not a site
NO_FRAMES = "<no Python frames: C++ / autograd engine>"
BEFORE_RECORDING = "<allocated before recording (loading)>"


def marker_size(step: int, phase: str) -> int:
    """Bytes of the uint8 marker allocated when `phase` of `step` begins ("start") or ends (the others)."""
    return MARKER_BASE + 2 * (len(PHASES) * step + PHASES.index(phase))


def _marker_of(size) -> tuple[int, str] | None:
    if not isinstance(size, int) or size < MARKER_BASE or (size - MARKER_BASE) % 2:
        return None
    code = (size - MARKER_BASE) // 2
    if code >= len(PHASES) * MAX_MARKED_STEPS:
        return None
    return code // len(PHASES), PHASES[code % len(PHASES)]


@lru_cache(maxsize=None)
def library_path(filename: str) -> str:
    """`.../site-packages/torch/optim/adamw.py` -> `torch/optim/adamw.py`; `/x/repo/fastlm/k.py` -> `fastlm/k.py`."""
    name = str(filename or "?").replace("\\", "/")
    for root in ("site-packages/", "dist-packages/"):
        if root in name:
            return name.rsplit(root, 1)[1]
    for lib in _LIBRARIES + ("scripts/", "tests/"):
        at = name.rfind("/" + lib)
        if at >= 0:
            return name[at + 1:]
    return "/".join(name.split("/")[-2:])


def short_path(filename: str) -> str:
    """library_path, with other libraries' deep paths cut to top folder and file: `transformers/.../modeling_x.py`."""
    path = library_path(filename)
    parts = path.split("/")
    if parts[0] == "fastlm" or len(parts) <= 3:
        return path
    return f"{parts[0]}/.../{parts[-1]}"


def frame_label(frame: dict) -> str:
    return f"{short_path(frame.get('filename', '?'))}:{frame.get('line', '?')} {frame.get('name', '?')}"


def _is_python(frame: dict) -> bool:
    name = str(frame.get("filename", ""))
    return name.endswith(".py") or name.startswith("<")


def allocation_site(frames, depth: int = 2) -> str:
    """The innermost `depth` Python frames that are not plumbing, innermost first, joined by " < "; when none of
    them is fastlm's, the innermost fastlm frame further out is added after "...". Without Python frames, the
    first C++ autograd node or ATen function (recorded with C++ stacks), else NO_FRAMES."""
    frames = [f for f in (frames or []) if isinstance(f, dict)]
    python = [f for f in frames if _is_python(f)]
    useful = [f for f in python if not any(p in library_path(f.get("filename", "")) for p in _PLUMBING)]
    if not useful:
        if python:
            return frame_label(python[0])
        for needle in ("autograd::generated::", "at::native::", "at::"):
            hit = next((f for f in frames if needle in str(f.get("name", ""))), None)
            if hit is not None:
                return str(hit["name"])[:100]
        return NO_FRAMES
    picked = useful[:depth]
    labels = [frame_label(f) for f in picked]
    if not any(library_path(f.get("filename", "")).startswith("fastlm/") for f in picked):
        outer = next((f for f in useful[depth:] if library_path(f.get("filename", "")).startswith("fastlm/")
                      and not any(d in library_path(f.get("filename", "")) for d in _DRIVERS)), None)
        if outer is not None:
            labels.append("... " + frame_label(outer))
    return " < ".join(labels)


@dataclass
class Live:
    size: int  # bytes the allocator counts (block size, or the request rounded up to 512)
    site: str
    before_step: bool
    event: int = -1  # index of the alloc entry in the step's trace, -1 when it was live before


def _rounded(size: int) -> int:
    return max(512, -(-int(size) // 512) * 512)


def _blocks_of(segment: dict):
    """A segment's blocks with their addresses (older snapshots give none: blocks tile the segment in order)."""
    address = segment.get("address", 0)
    for block in segment.get("blocks", []) or []:
        yield block.get("address", address), block
        address += block.get("size", 0)


def live_before(snapshot: dict, device: int = 0, labels: dict | None = None, depth: int = 2) -> dict[int, Live]:
    """Blocks held by tensors in `snapshot` ("active_allocated"), by address. A block allocated before recording
    began has no frames; `labels` (address -> name, e.g. the model's parameters) names it then."""
    labels = labels or {}
    out = {}
    for seg in snapshot.get("segments", []) or []:
        if seg.get("device", device) != device:
            continue
        for addr, block in _blocks_of(seg):
            if block.get("state") != "active_allocated":
                continue
            frames = block.get("frames")
            if frames is None and block.get("history"):  # torch < 2.1 kept the frames in a history list
                frames = block["history"][-1].get("frames")
            site = allocation_site(frames, depth) if frames else labels.get(addr, BEFORE_RECORDING)
            out[addr] = Live(int(block.get("size", 0)), site, True)
    return out


def device_trace(snapshot: dict, device: int = 0) -> list[dict]:
    traces = snapshot.get("device_traces")
    if not traces or device >= len(traces):
        raise ValueError("the snapshot holds no allocation history (device_traces): record it with "
                         "torch.cuda.memory._record_memory_history(enabled='all') before the step")
    return traces[device] or []


def step_window(trace: list[dict], step: int) -> tuple[int, int, dict[int, str]]:
    """Indices [first, last) of `step`'s entries (between its "start" marker and the next step's, or the end of the
    trace) and the phase boundaries inside it: {index of the first entry after the marker: phase that ended}."""
    start = None
    for i, e in enumerate(trace):
        if e.get("action") == "alloc" and e.get("size") == marker_size(step, "start"):
            start = i
    if start is None:
        raise ValueError(f"step {step}'s start marker ({marker_size(step, 'start')} bytes) is not in the trace: "
                         "the history ring buffer wrapped (raise max_entries) or recording began later")
    end, phases = len(trace), {}
    for i in range(start + 1, len(trace)):
        e = trace[i]
        mark = _marker_of(e.get("size")) if e.get("action") == "alloc" else None
        if mark is None:
            continue
        if mark[0] != step:
            end = i
            break
        phases[i + 1] = mark[1]
    return start, end, phases


@dataclass
class StepPeak:
    step: int
    baseline: int  # bytes held at the start marker
    peak: int  # the highest held bytes during the step (block sizes; requests rounded up to 512)
    peak_event: int  # index of the alloc that reached it, counted from the step's first entry
    events: int
    phase: str  # the phase the peak falls in: forward / backward / optimizer
    groups: list[dict] = field(default_factory=list)
    around: list[dict] = field(default_factory=list)
    unmatched_frees: int = 0

    def as_dict(self) -> dict:
        return {"step": self.step, "baseline_gb": round(self.baseline / 2 ** 30, 4),
                "peak_gb": round(self.peak / 2 ** 30, 4),
                "peak_over_baseline_mb": round((self.peak - self.baseline) / MB, 1),
                "peak_event": self.peak_event, "events": self.events, "phase": self.phase,
                "unmatched_frees": self.unmatched_frees, "top": self.groups, "around_peak": self.around}


def _phase_at(phases: dict[int, str], index: int) -> str:
    ended = [phase for at, phase in sorted(phases.items()) if at <= index]
    return _IN_PROGRESS[ended[-1] if ended else "start"]


def analyse_step(before: dict, trace: list[dict], step: int, *, device: int = 0, labels: dict | None = None,
                 top: int = 25, events_before: int = 15, events_after: int = 5, depth: int = 2) -> StepPeak:
    """Replay `step` (its trace entries, delimited by markers) on the blocks live in `before` (a snapshot taken
    just before the step's start marker). Returns the peak, the live memory at it grouped by allocation site
    (largest first, `top` groups) and the `events_before` entries up to and including the one that reached it
    (plus `events_after` after it); an event's offset counts history entries from the peak's."""
    first, end, phases = step_window(trace, step)
    live = live_before(before, device, labels, depth)
    baseline = sum(b.size for b in live.values())
    entries = [(i, e) for i, e in enumerate(trace[first + 1:end], start=first + 1)
               if _marker_of(e.get("size")) is None]

    def replay(stop: int | None):
        held, blocks, best, best_at, unmatched, log = baseline, dict(live), baseline, -1, 0, []
        for n, (i, e) in enumerate(entries):
            action, addr = e.get("action"), e.get("addr")
            if action == "alloc":
                blocks[addr] = Live(_rounded(e.get("size", 0)), allocation_site(e.get("frames"), depth), False, n)
                held += blocks[addr].size
                log.append((n, "alloc", blocks[addr]))
                if held > best:
                    best, best_at = held, n
            elif action in ("free_requested", "free", "free_completed"):
                gone = blocks.pop(addr, None)
                if gone is not None:
                    held -= gone.size
                    log.append((n, "free", gone))
                elif action != "free_completed":
                    unmatched += 1
            if stop is not None and n == stop:
                return blocks, log
        return best, best_at, unmatched, log

    peak, peak_at, unmatched, log = replay(None)
    result = StepPeak(step, baseline, peak, peak_at, len(entries), "start", unmatched_frees=unmatched)
    if peak_at < 0:
        return result
    result.phase = _phase_at(phases, entries[peak_at][0])
    at_peak, _ = replay(peak_at)
    groups: dict[str, dict] = {}
    for block in at_peak.values():
        g = groups.setdefault(block.site, {"where": block.site, "mb": 0.0, "blocks": 0, "mb_before_step": 0.0})
        g["mb"] += block.size / MB
        g["blocks"] += 1
        if block.before_step:
            g["mb_before_step"] += block.size / MB
    ordered = sorted(groups.values(), key=lambda g: -g["mb"])
    result.groups = [dict(g, mb=round(g["mb"], 2), mb_before_step=round(g["mb_before_step"], 2))
                     for g in ordered[:top]]
    near = [item for item in log if item[0] <= peak_at][-events_before:] + \
        [item for item in log if item[0] > peak_at][:events_after]
    result.around = [{"offset": n - peak_at, "action": action, "mb": round(b.size / MB, 3), "where": b.site}
                     for n, action, b in near]
    return result


def format_step(peak: StepPeak, width: int = 130, top: int | None = None, events: int | None = None) -> str:
    """The report of one step: its peak, the `top` largest sites live at it, the `events` entries up to it."""
    groups = peak.groups[:top] if top else peak.groups
    around = peak.around
    if events:
        around = [e for e in around if e["offset"] <= 0][-events:] + [e for e in around if e["offset"] > 0]
    lines = [f"step {peak.step}: peak {peak.peak / 2 ** 30:.4f} GiB during {peak.phase} "
             f"(held at step start {peak.baseline / 2 ** 30:.4f} GiB, +{(peak.peak - peak.baseline) / MB:.1f} MB; "
             f"event {peak.peak_event} of {peak.events})"]
    lines.append(f"  live at the peak, by allocation site ({len(groups)} largest):")
    lines.append(f"  {'MB':>9} {'blocks':>6} {'before':>9}  where (innermost first)")
    for g in groups:
        lines.append(f"  {g['mb']:9.2f} {g['blocks']:6d} {g['mb_before_step']:9.2f}  {g['where'][:width]}")
    lines.append("  events up to the peak (offset 0 reached it):")
    for e in around:
        lines.append(f"  {e['offset']:+4d} {e['action']:5} {e['mb']:10.3f} MB  {e['where'][:width]}")
    if peak.unmatched_frees:
        lines.append(f"  ({peak.unmatched_frees} frees of blocks not seen live: history incomplete)")
    return "\n".join(lines)


_LAYER = re.compile(r"\.(\d+)\.")


def parameter_labels(named_tensors) -> dict[int, str]:
    """address -> "param model.layers.*.x" for (name, tensor) pairs whose storage starts a block (layers merged)."""
    out = {}
    for name, tensor in named_tensors:
        try:
            addr = tensor.untyped_storage().data_ptr()
        except Exception:  # noqa: BLE001 - meta / CPU / odd tensors: just unnamed
            continue
        out.setdefault(addr, "param " + _LAYER.sub(".*.", name))
    return out
