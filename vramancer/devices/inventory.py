"""Real devices on this machine: NVIDIA via NVML, ROCm / MPS via torch (only where present),
host RAM via psutil, and a disk tier. A missing driver or library is not an error: that kind
of device is simply absent.

Speeds the drivers do not report (memory bandwidth, TFLOPs) come from the GPU catalog by name;
a GPU the catalog does not know gets conservative defaults and says so in its name.
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

from .device import Device

__all__ = ["real_devices", "gpu_devices", "host_device", "disk_device", "HOST_BANDWIDTH_BYTES_PER_S",
           "DISK_BANDWIDTH_BYTES_PER_S", "UNKNOWN_GPU_BANDWIDTH_BYTES_PER_S", "UNKNOWN_GPU_TFLOPS"]

# Host RAM read bandwidth a CPU forward achieves (dual-channel DDR4-3200 peaks at 51 GB/s,
# DDR5-5600 at 90 GB/s; a matmul-vector loop reaches ~60-70% of that).
HOST_BANDWIDTH_BYTES_PER_S = 40e9
# Sequential read of a consumer NVMe SSD through the page cache (PCIe 3.0 x4 peaks ~3.5 GB/s).
DISK_BANDWIDTH_BYTES_PER_S = 2.0e9
# An unknown GPU: the speed of the slowest catalog GPUs still useful for LLMs (GTX 1060 class).
UNKNOWN_GPU_BANDWIDTH_BYTES_PER_S = 192e9
UNKNOWN_GPU_TFLOPS = 4.0
# PCIe 4.0 x16 theoretical, one direction.
DEFAULT_LINK_BYTES_PER_S = 31.5e9


def host_device(total_bytes: int | None = None, free_bytes: int | None = None) -> Device:
    """Host RAM. Its read bandwidth and FLOP/s are what a CPU forward reaches on this machine
    (devices/host_speed.py: measured when kept, else per-thread defaults); its link is the memcpy
    bandwidth copies to a GPU start from."""
    import psutil

    from .host_speed import host_speed

    vm = psutil.virtual_memory()
    speed = host_speed()
    total = int(total_bytes if total_bytes is not None else vm.total)
    free = int(free_bytes if free_bytes is not None else (total if total_bytes is not None else vm.available))
    return Device(
        id="cpu", name=f"CPU RAM ({platform.machine() or 'host'})", kind="cpu",
        total_bytes=total, free_bytes=min(free, total),
        bandwidth_bytes_per_s=speed.bandwidth_bytes_per_s, tflops=speed.tflops,
        simulated=total_bytes is not None, backing="cpu" if total_bytes is not None else None,
        torch_device="cpu", link_bandwidth_bytes_per_s=HOST_BANDWIDTH_BYTES_PER_S,
    )


def default_disk_path() -> Path:
    from .._paths import cache_dir

    return cache_dir()


def disk_device(total_bytes: int | None = None, path: str | os.PathLike | None = None) -> Device:
    p = Path(path) if path else default_disk_path()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    total = int(total_bytes if total_bytes is not None else usage.total)
    free = int(total if total_bytes is not None else usage.free)
    return Device(
        id="disk", name=f"disk ({p})", kind="disk", total_bytes=total, free_bytes=min(free, total),
        bandwidth_bytes_per_s=DISK_BANDWIDTH_BYTES_PER_S, tflops=0.0,
        simulated=total_bytes is not None, backing="cpu", torch_device="cpu",
        link_bandwidth_bytes_per_s=DISK_BANDWIDTH_BYTES_PER_S,
    )


def _link_bytes_per_s(gen: int | None, width: int | None) -> float:
    per_lane = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
    if gen in per_lane and width:
        return per_lane[gen] * width
    return DEFAULT_LINK_BYTES_PER_S


def _from_catalog(name: str, total_bytes: int):
    from .catalog import match_device_name

    return match_device_name(name, memory_bytes=total_bytes)


def _nvidia_devices() -> list[Device]:
    try:
        from .nvml import gpus
    except ImportError:  # pragma: no cover - module always ships
        return []
    out = []
    for g in gpus():
        spec = _from_catalog(g.name, g.total_bytes)
        link = _link_bytes_per_s(getattr(g, "pcie_gen", None), getattr(g, "pcie_width", None))
        out.append(Device(
            id=f"cuda:{g.index}", name=g.name if spec else f"{g.name} (speed unknown: estimated)",
            kind="gpu", total_bytes=int(g.total_bytes), free_bytes=int(g.free_bytes),
            bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s if spec else UNKNOWN_GPU_BANDWIDTH_BYTES_PER_S,
            tflops=spec.tflops if spec else UNKNOWN_GPU_TFLOPS,
            simulated=False, torch_device=f"cuda:{g.index}", uuid=g.uuid, pci_bus_id=g.pci_bus_id,
            link_bandwidth_bytes_per_s=link, vendor="nvidia", catalog_key=spec.key if spec else None,
            p2p_peers=tuple(getattr(g, "p2p_peers", ()) or ()),
        ))
    return out


def _torch_devices() -> list[Device]:
    """ROCm GPUs and Apple MPS through torch, only where they can exist (torch import is slow)."""
    rocm = Path("/dev/kfd").exists() or Path("/opt/rocm").exists()
    mac = sys.platform == "darwin" and platform.machine() == "arm64"
    if not (rocm or mac):
        return []
    try:
        import torch
    except ImportError:
        return []
    out: list[Device] = []
    if rocm and getattr(torch.version, "hip", None) and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            spec = _from_catalog(name, total)
            out.append(Device(
                id=f"cuda:{i}", name=name, kind="gpu", total_bytes=int(total), free_bytes=int(free),
                bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s if spec else UNKNOWN_GPU_BANDWIDTH_BYTES_PER_S,
                tflops=spec.tflops if spec else UNKNOWN_GPU_TFLOPS, torch_device=f"cuda:{i}", vendor="amd",
                catalog_key=spec.key if spec else None,
            ))
    if mac and torch.backends.mps.is_available():
        import psutil

        total = psutil.virtual_memory().total
        # MPS may use up to recommendedMaxWorkingSetSize, ~75% of unified memory by default.
        limit = int(total * 0.75)
        free = max(0, limit - int(torch.mps.driver_allocated_memory()))
        out.append(Device(
            id="mps", name=f"Apple GPU ({platform.processor() or 'arm64'})", kind="gpu", total_bytes=limit,
            free_bytes=free, bandwidth_bytes_per_s=200e9, tflops=14.0, torch_device="mps", vendor="apple",
            unified_memory=True, link_bandwidth_bytes_per_s=200e9,
        ))
    return out


def gpu_devices() -> list[Device]:
    nvidia = _nvidia_devices()
    return nvidia if nvidia else _torch_devices()


def real_devices(include_disk: bool = True) -> list[Device]:
    """Every real device: GPUs, then host RAM, then the disk tier."""
    devices = gpu_devices() + [host_device()]
    if include_disk:
        devices.append(disk_device())
    return devices
