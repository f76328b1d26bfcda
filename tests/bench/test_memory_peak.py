"""fastlm/bench/memory_peak.py on a hand-built allocator snapshot (the format torch.cuda.memory._snapshot() returns):
the replayed peak, its phase, what is live at it grouped by allocation site, and the events leading to it; plus
scripts/gpu_train_memory.py refusing to run without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm.bench import memory_peak as mp

MB = 2 ** 20
SITE = "/opt/venv/lib/python3.12/site-packages/"
REPO = "/root/repo/"


def fr(path, line, name):
    return {"filename": path, "line": line, "name": name}


DRIVER = fr(REPO + "fastlm/bench/train_worker.py", 170, "train_step")
CE_FRAMES = [fr(REPO + "fastlm/kernels/cross_entropy.py", 88, "_chunk_backward"),
             fr(SITE + "torch/autograd/function.py", 300, "apply"),
             fr(REPO + "fastlm/patch/loss.py", 50, "forward"),
             fr(SITE + "torch/nn/modules/module.py", 1750, "_call_impl"), DRIVER]
LORA_FRAMES = [fr(SITE + "peft/tuners/lora/layer.py", 700, "forward"),
               fr(SITE + "torch/nn/modules/module.py", 1750, "_call_impl"),
               fr(SITE + "transformers/models/llama/modeling_llama.py", 300, "forward"),
               fr(REPO + "fastlm/patch/offload_checkpointing.py", 120, "backward"), DRIVER]
ADAM_FRAMES = [fr(SITE + "torch/optim/adamw.py", 150, "_init_group"), fr(SITE + "torch/optim/adamw.py", 220, "step"),
               fr(SITE + "torch/optim/optimizer.py", 500, "wrapper"), DRIVER]
CPP_FRAMES = [fr("??", 0, "c10::cuda::CUDACachingAllocator::malloc"),
              fr("??", 0, "torch::autograd::generated::MmBackward0::apply(std::vector<at::Tensor>&&)")]
CE_SITE = "fastlm/kernels/cross_entropy.py:88 _chunk_backward < fastlm/patch/loss.py:50 forward"
LORA_SITE = ("peft/.../layer.py:700 forward < transformers/.../modeling_llama.py:300 forward"
             " < ... fastlm/patch/offload_checkpointing.py:120 backward")
ADAM_SITE = "torch/optim/adamw.py:150 _init_group < torch/optim/adamw.py:220 step"

SEG_A, SEG_B = 0x1000_0000, 0x2000_0000
EMBED, ADAM_STATE, LEGACY_ACTIVE = SEG_A, SEG_A + 100 * MB, SEG_B + 10 * MB


def before_snapshot():
    """128 MB held by tensors on device 0: a 100 MB weight loaded before recording (named by its address), 20 MB of
    optimizer state with frames, 8 MB in a legacy segment whose blocks carry no addresses; plus blocks that hold no
    tensor (inactive, awaiting free) and another device's."""
    return {"segments": [
        {"device": 0, "address": SEG_A, "total_size": 160 * MB, "blocks": [
            {"address": EMBED, "size": 100 * MB, "requested_size": 100 * MB, "state": "active_allocated",
             "frames": []},
            {"address": ADAM_STATE, "size": 20 * MB, "requested_size": 20 * MB - 100, "state": "active_allocated",
             "frames": ADAM_FRAMES},
            {"address": SEG_A + 120 * MB, "size": 40 * MB, "requested_size": 0, "state": "inactive", "frames": []}]},
        {"device": 0, "address": SEG_B, "total_size": 22 * MB, "blocks": [
            {"size": 10 * MB, "requested_size": 0, "state": "inactive"},
            {"size": 8 * MB, "requested_size": 8 * MB, "state": "active_allocated"},
            {"size": 4 * MB, "requested_size": 4 * MB, "state": "active_awaiting_free"}]},
        {"device": 1, "address": 0x9000_0000, "total_size": 50 * MB, "blocks": [
            {"address": 0x9000_0000, "size": 50 * MB, "requested_size": 50 * MB, "state": "active_allocated"}]},
    ], "device_traces": [[], []]}


def ev(action, addr, size, frames=None):
    return {"action": action, "addr": addr, "size": size, "frames": frames or [], "stream": 0}


def mark(step, phase, addr=0x7000_0000):
    size = mp.marker_size(step, phase)
    return [ev("alloc", addr, size, [fr(REPO + "scripts/gpu_train_memory.py", 70, "marker")]),
            ev("free_requested", addr, size), ev("free_completed", addr, size)]


def step_trace():
    a1, a2, g1, g2, g3, o1 = (0x3000_0000 + i * 0x0100_0000 for i in range(6))
    return (
        [ev("alloc", 0x6000_0000, 5 * MB), ev("free_requested", 0x6000_0000, 5 * MB)]  # the step before
        + mark(0, "start")
        + [ev("alloc", a1, 64 * MB), ev("alloc", a2, 1000, CPP_FRAMES), ev("segment_alloc", 0x5000_0000, 2 * MB),
           ev("free_requested", a1, 64 * MB), ev("free_completed", a1, 64 * MB)]
        + mark(0, "forward")
        + [ev("alloc", g1, 32 * MB, LORA_FRAMES), ev("alloc", g2, 48 * MB, CE_FRAMES),  # the peak: 208 MB + 1 KiB
           ev("free_requested", ADAM_STATE, 20 * MB - 100, ADAM_FRAMES),  # a block live before the step
           ev("free_requested", 0x0BAD_0000, 3 * MB),  # never seen live: counted, not subtracted
           ev("free_requested", g2, 48 * MB), ev("free_completed", g2, 48 * MB), ev("alloc", g3, 16 * MB)]
        + mark(0, "backward")
        + [ev("alloc", o1, 10 * MB, ADAM_FRAMES), ev("free_requested", o1, 10 * MB)]
        + mark(0, "optimizer")
        + mark(1, "start") + [ev("alloc", 0x4000_0000, 1024 * MB)]  # the next step: outside the window
    )


def test_replays_the_peak_and_names_what_is_live_at_it():
    labels = {EMBED: "param model.embed_tokens.weight"}
    peak = mp.analyse_step(before_snapshot(), step_trace(), 0, labels=labels, top=5, events_before=3,
                           events_after=2)
    assert peak.baseline == 128 * MB
    assert peak.peak == 208 * MB + 1024  # the 1000-byte request holds a 1024-byte block
    assert peak.phase == "backward"
    assert (peak.peak_event, peak.events, peak.unmatched_frees) == (6, 14, 1)  # history entries, markers left out
    assert [(g["where"], g["mb"], g["blocks"], g["mb_before_step"]) for g in peak.groups] == [
        ("param model.embed_tokens.weight", 100.0, 1, 100.0),
        (CE_SITE, 48.0, 1, 0.0),
        (LORA_SITE, 32.0, 1, 0.0),
        (ADAM_SITE, 20.0, 1, 20.0),
        (mp.BEFORE_RECORDING, 8.0, 1, 8.0),
    ]
    assert [(e["offset"], e["action"], e["mb"], e["where"]) for e in peak.around] == [
        (-3, "free", 64.0, mp.NO_FRAMES),
        (-1, "alloc", 32.0, LORA_SITE),
        (0, "alloc", 48.0, CE_SITE),
        (1, "free", 20.0, ADAM_SITE),
        (3, "free", 48.0, CE_SITE),
    ]
    text = mp.format_step(peak)
    assert "peak 0.2031 GiB during backward" in text and CE_SITE in text
    data = peak.as_dict()
    assert data["peak_over_baseline_mb"] == 80.0 and data["top"][1]["where"] == CE_SITE


def test_a_peak_in_the_optimizer_step_and_the_tiny_allocation_site_from_cpp_frames():
    trace = mark(2, "start") + [ev("alloc", 0x100, 1000, CPP_FRAMES)] + mark(2, "forward") + mark(2, "backward") \
        + [ev("alloc", 0x200, 6 * MB, ADAM_FRAMES)] + mark(2, "optimizer")
    peak = mp.analyse_step({"segments": []}, trace, 2)
    assert (peak.peak, peak.phase, peak.baseline) == (6 * MB + 1024, "optimizer step", 0)
    assert peak.groups[1]["where"] == "torch::autograd::generated::MmBackward0::apply(std::vector<at::Tensor>&&)"


def test_a_trace_without_the_steps_marker_says_the_history_wrapped():
    with pytest.raises(ValueError, match="max_entries"):
        mp.analyse_step(before_snapshot(), step_trace(), 5)
    with pytest.raises(ValueError, match="record_memory_history"):
        mp.device_trace({"segments": []}, 0)


def test_allocation_sites_and_paths():
    assert mp.short_path(SITE + "torch/optim/adamw.py") == "torch/optim/adamw.py"
    assert mp.short_path(SITE + "torch/utils/checkpoint/x.py") == "torch/.../x.py"
    assert mp.short_path("/home/u/fastlm/fastlm/kernels/lora.py") == "fastlm/kernels/lora.py"
    assert mp.short_path("/tmp/x/scripts/gpu_train_memory.py") == "scripts/gpu_train_memory.py"
    assert mp.allocation_site([]) == mp.allocation_site(None) == mp.NO_FRAMES
    assert mp.allocation_site(CE_FRAMES, depth=1) == "fastlm/kernels/cross_entropy.py:88 _chunk_backward"
    # only plumbing and the driver: the innermost Python frame still says something
    only_plumbing = [fr(SITE + "torch/_tensor.py", 600, "backward"), DRIVER]
    assert mp.allocation_site(only_plumbing) == "fastlm/bench/train_worker.py:170 train_step"


def test_parameter_labels_merge_layers():
    a, b = torch.zeros(4), torch.zeros(4)
    labels = mp.parameter_labels([("model.layers.0.mlp.w", a), ("model.layers.12.mlp.w", b)])
    assert labels == {a.untyped_storage().data_ptr(): "param model.layers.*.mlp.w",
                      b.untyped_storage().data_ptr(): "param model.layers.*.mlp.w"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_the_gpu_script_refuses_without_a_gpu():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gpu_train_memory.py"), "--batch", "1"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
