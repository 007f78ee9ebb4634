"""The hardware ceiling the bandwidth-bound ops are measured against: copy bandwidth, measured in the same run.

A large device-to-device copy (dst.copy_(src)) moves 2 x its size (one read, one write); its bandwidth is the most a
streaming kernel can hope for on this device, so "fraction of copy bandwidth" is an honest roofline that needs no
spec sheet. On the CPU it is a memcpy of a large tensor by torch's own threads.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from .timing import time_fn

# our choice: 1 GiB on CUDA (far beyond any L2), 256 MiB on the CPU (beyond any L3, quick on 2 cores)
CUDA_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 256 << 20


def measure_copy_bandwidth(device: torch.device, *, n_bytes: int | None = None, warmup_ms: float = 25,
                           rep_ms: float = 100) -> dict[str, Any]:
    """Time dst.copy_(src) of n_bytes -> {"GBps", "bytes", "time_ms", "method"} (GBps counts read + write)."""
    if n_bytes is None:
        n_bytes = CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    stats = time_fn(lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return {
        "GBps": 2 * n_bytes / (stats.median_ms * 1e-3) / 1e9,
        "bytes": n_bytes,
        "time_ms": stats.as_dict(),
        "method": f"{'device-to-device' if device.type == 'cuda' else 'host'} copy_ of {n_bytes >> 20} MiB, "
                  "read + write bytes / median time",
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    """Name and size of the device the run used; the CPU is labelled as such in the name."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "sm_count": p.multi_processor_count,
                "total_memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}"}
    return {"type": "cpu", "name": f"CPU: {cpu_model()}", "threads": torch.get_num_threads(),
            "cores_visible": os.cpu_count()}


def device_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name of the device, 'cpu-...' for CPUs, e.g. cpu-amd-epyc-7b13, nvidia-h100-80gb-hbm3."""
    name = info["name"].removeprefix("CPU: ")
    slug = "".join(c.lower() if c.isalnum() else "-" for c in name)
    slug = "-".join(part for part in slug.split("-") if part)
    return f"cpu-{slug}" if info["type"] == "cpu" else slug
