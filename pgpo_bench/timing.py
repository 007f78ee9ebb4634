"""Timing and peak-memory measurement of one callable, on CUDA or on the CPU.

CUDA: triton.testing.do_bench (CUDA events, L2 flushed before every run, warm-up then repeats for a time budget),
median and 20th/80th percentiles. CPU: time.perf_counter around each call, the same statistics. Peak extra memory
is measured on CUDA only: torch's CPU allocator keeps no peak counter, and process RSS mixes in the allocator's
cache, so on the CPU it is reported as not measured (None) rather than guessed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

CPU_PEAK_MEMORY_NOTE = "not measured on CPU: torch's CPU allocator keeps no peak counter"
CUDA_PEAK_MEMORY_NOTE = ("torch.cuda.max_memory_allocated during one call minus memory_allocated just before it: "
                         "inputs excluded, outputs and temporaries included")


@dataclass
class TimeStats:
    """Wall time of one call in milliseconds: median and 20th/80th percentiles over n samples."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int | None  # samples taken; None where do_bench does not say
    timer: str

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median_ms, "p20": self.p20_ms, "p80": self.p80_ms, "n": self.n, "timer": self.timer}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable[[], Any], *, warmup_ms: float, rep_ms: float, min_reps: int = 5,
             max_reps: int = 1000) -> TimeStats:
    """Time fn on the CPU: warm up for warmup_ms (at least once), then sample until rep_ms (min/max reps)."""
    t_end = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    samples: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(samples) < min_reps or (time.perf_counter() < t_end and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")  # numpy's default linear interpolation
    return TimeStats(deciles[4], deciles[1], deciles[7], len(samples), "time.perf_counter")


def time_cuda(fn: Callable[[], Any], *, warmup_ms: float, rep_ms: float) -> TimeStats:
    """Time fn on CUDA with triton.testing.do_bench (CUDA events, L2 cache flushed between runs)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms), quantiles=[0.5, 0.2, 0.8])
    return TimeStats(float(med), float(p20), float(p80), None, "triton.testing.do_bench")


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100) -> TimeStats:
    """Median and spread of fn's run time on `device` (see the module docstring for the method)."""
    if device.type == "cuda":
        return time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return time_cpu(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)


def call_with_peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """Run fn once -> (its output, peak extra bytes on CUDA or None on the CPU)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, int(torch.cuda.max_memory_allocated(device) - base)


def peak_memory_note(device: torch.device) -> str:
    return CUDA_PEAK_MEMORY_NOTE if device.type == "cuda" else CPU_PEAK_MEMORY_NOTE
