"""verl 0.9.1 on a CPU-only machine: the two stand-ins the real-code tests need, and nothing else.

- a CPU platform for verl's device layer (verl's platform registry knows CUDA, NPU and ROCm only and falls back
  to CUDA), so that its FSDP engine builds the model on CPU and talks gloo;
- flash-attn's varlen kernel (per-segment SDPA, tests/support/flash_standin.py) in the modules that imported it
  from flash-attn (verl's Qwen2-VL attention patch), where flash-attn has no CPU build.

Everything else (apply_monkey_patch, the engine worker, RayPPOTrainer's _compute_old_log_prob / _update_actor, the
padding helpers, dynamic batching) is verl's code as installed.
"""

from __future__ import annotations

import os
import socket

import flash_standin
import torch


class _CPUDeviceModule:
    """torch.cpu plus the memory counters verl's logging reads from torch.cuda (all 0 on CPU)."""

    def __getattr__(self, name):
        if "memory" in name or name in ("mem_get_info",):
            return lambda *a, **k: (0, 0) if name == "mem_get_info" else 0
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name in ("empty_cache", "reset_peak_memory_stats", "ipc_collect", "set_device"):
            return lambda *a, **k: None
        if name == "get_device_name":
            return lambda *a, **k: "CPU"  # verl's FLOPs table has no CPU entry: MFU is reported as 0
        raise AttributeError(f"the CPU stand-in for verl's device module has no {name!r}")


def use_cpu_platform() -> None:
    """Make verl's device layer report a CPU device (gloo, torch.cpu) before any verl code asks for it."""
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    class PlatformCPU(PlatformCUDA):
        device_name = "cpu"
        vendor_name = "cpu"

        @property
        def device_module(self):
            return _CPUDeviceModule()

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            return True

        def current_device(self):
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def is_ipc_supported(self) -> bool:
            return False

    for name in ("device_name", "vendor_name"):  # PlatformCUDA declares them as properties
        setattr(PlatformCPU, name, property(lambda self, v=getattr(PlatformCPU, name): v))
    platform_manager._current_platform = PlatformCPU()
    # the engine registry lists FSDP for cuda / npu; the engine itself is device-agnostic torch (FSDP over gloo)
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    os.environ["VERL_ENGINE_VENDOR"] = "nvidia"


def init_single_process_group() -> None:
    """verl's workers expect a torch.distributed world (Ray sets RANK etc.); here: one gloo process."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def install_flash_standin() -> None:
    """flash-attn's varlen kernel, where verl imported it (its Qwen2-VL attention patch): per-segment SDPA."""
    from verl.models.transformers import qwen2_vl

    flash_standin.install_into(qwen2_vl)
