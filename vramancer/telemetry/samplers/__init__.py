"""Samplers: where samples come from. Each keeps the ``Sampler`` interface (``name``,
``sample() -> Snapshot``, ``close()``):

    NvmlSampler             NVIDIA GPUs through NVML            devices "cuda:N"
    AmdSmiSampler           AMD GPUs through AMD SMI            devices "rocm:N"
    TorchAllocatorSampler   this process's torch allocator      devices "torch:cuda:N", "torch:mps"
    HostSampler             host RAM through psutil             device  "cpu"
    SimulatedSampler        bytes the runtime accounted on simulated devices
    ReplaySampler           a recorded trace played back

``default_samplers(devices)`` picks what this machine has.
"""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from typing import Any

from ...errors import DeviceSpecError
from .amd import AmdSmiSampler
from .base import Sampler
from .host import HostSampler
from .nvml import NvmlSampler
from .replay import ReplaySampler
from .simulated import SimulatedSampler
from .torch_allocator import TorchAllocatorSampler

__all__ = [
    "Sampler",
    "NvmlSampler",
    "AmdSmiSampler",
    "TorchAllocatorSampler",
    "HostSampler",
    "SimulatedSampler",
    "ReplaySampler",
    "default_samplers",
]

_CUDA = re.compile(r"^cuda:(\d+)(?::.*)?$")
_ROCM = re.compile(r"^(?:rocm|amd):(\d+)(?::.*)?$")
_CPU = re.compile(r"^cpu(?::.*)?$")


def _amdsmi_importable() -> bool:
    try:
        return importlib.util.find_spec("amdsmi") is not None
    except (ImportError, ValueError):
        return False


def _items(devices: Any) -> list[tuple[str, str | None]]:
    """(id, vendor) per requested device, from a spec string or a list of Device objects."""
    if isinstance(devices, str):
        return [(item.strip().lower(), None) for item in devices.split(",") if item.strip()]
    out = []
    for d in devices:
        if isinstance(d, str):
            out.append((d.strip().lower(), None))
        elif getattr(d, "simulated", False):
            raise DeviceSpecError(f"{d.id!r} is a simulated device: nothing on this machine to sample; "
                                  "a split run on simulated devices feeds a SimulatedSampler")
        elif getattr(d, "kind", None) == "disk":
            continue   # the disk tier has no memory to sample
        else:
            out.append((str(d.id).lower(), getattr(d, "vendor", None)))
    return out


def default_samplers(devices: str | Iterable[Any] | None = None) -> list[Sampler]:
    """The samplers for ``devices``: None or "auto" means every real device here (NVML if it
    starts, AMD SMI if it imports and starts, the torch allocator of this process, host RAM).
    Otherwise a spec string ("cuda:0,cuda:1,cpu") or a list of real ``Device`` objects:
    "cuda:N" -> NVML GPU N (and torch's view of it), "rocm:N" -> AMD SMI GPU N, "mps" -> torch's
    MPS allocator, "cpu" -> host RAM. Anything else raises DeviceSpecError."""
    if devices is None or (isinstance(devices, str) and devices.strip().lower() in ("", "auto")):
        samplers: list[Sampler] = []
        nvml = NvmlSampler()
        if nvml.available():
            samplers.append(nvml)
        if _amdsmi_importable():
            amd = AmdSmiSampler()
            if amd.available():
                samplers.append(amd)
        samplers.append(TorchAllocatorSampler())
        samplers.append(HostSampler())
        return samplers

    cuda: list[int] = []
    rocm: list[int] = []
    torch_wanted = host = False
    for item, vendor in _items(devices):
        if item == "auto":
            raise DeviceSpecError("'auto' cannot be combined with other devices")
        if m := _CUDA.match(item):
            if vendor == "amd":
                rocm.append(int(m.group(1)))
            else:
                cuda.append(int(m.group(1)))
            torch_wanted = True
        elif m := _ROCM.match(item):
            rocm.append(int(m.group(1)))
        elif item == "mps" or item.startswith("mps:"):
            torch_wanted = True
        elif _CPU.match(item):
            host = True
        elif item == "disk" or item.startswith("disk:"):
            continue
        else:
            raise DeviceSpecError(f"cannot sample {item!r}: telemetry samples real devices "
                                  "(cuda:N, rocm:N, mps, cpu, or auto)")
    samplers = []
    if cuda:
        samplers.append(NvmlSampler(indices=sorted(set(cuda))))
    if rocm:
        samplers.append(AmdSmiSampler(indices=sorted(set(rocm))))
    if torch_wanted:
        samplers.append(TorchAllocatorSampler(indices=sorted(set(cuda)) if cuda and not rocm else None))
    if host:
        samplers.append(HostSampler())
    return samplers
