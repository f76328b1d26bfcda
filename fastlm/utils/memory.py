"""Memory helpers that work with or without a GPU and say which they measured."""
from __future__ import annotations

import gc
import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryUsage:
    device: str  # "cuda:0" or "cpu"
    used_gb: float  # CUDA: allocated by torch; CPU: this process's resident set
    peak_gb: float  # CUDA: max allocated; CPU: peak resident set
    total_gb: float | None  # CUDA: device capacity; CPU: None
    note: str

    def __str__(self) -> str:
        total = f" of {self.total_gb:.2f} GB" if self.total_gb else ""
        return f"{self.device}: {self.used_gb:.2f} GB used{total}, peak {self.peak_gb:.2f} GB ({self.note})"


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_gb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except OSError:
        return peak_rss_gb()


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def gpu_memory_used(device: int | None = None) -> MemoryUsage:
    """Memory in use now and at peak. Without a GPU it reports this process's CPU memory and says so."""
    if torch.cuda.is_available():
        dev = torch.cuda.current_device() if device is None else device
        return MemoryUsage(f"cuda:{dev}", torch.cuda.memory_allocated(dev) / 2 ** 30,
                           torch.cuda.max_memory_allocated(dev) / 2 ** 30,
                           torch.cuda.get_device_properties(dev).total_memory / 2 ** 30,
                           "torch allocations on the GPU")
    return MemoryUsage("cpu", _rss_gb(), peak_rss_gb(), None, "no GPU: process resident memory")


def cleanup_memory() -> MemoryUsage:
    """Collect garbage and return cached GPU blocks to the driver. Returns the usage afterwards."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return gpu_memory_used()


def is_bf16_supported() -> bool:
    """True on CUDA GPUs with native bfloat16 (compute capability >= 8.0). False on CPU, where fastlm trains in
    float32 by default (the value users pass as `bf16=` to TrainingArguments)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
