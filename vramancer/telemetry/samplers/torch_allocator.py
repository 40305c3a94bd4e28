"""The torch caching allocator of this process, per CUDA / ROCm device and for MPS:
``used_bytes`` = memory_allocated, ``reserved_bytes`` = memory_reserved, ``peak_bytes`` =
max_memory_allocated. Device ids are "torch:cuda:N" and "torch:mps" so they never collide with
the driver's view of the same GPU ("cuda:N" from NVML).

It never imports torch: it samples only when the program already imported it, and only CUDA
devices already initialised (reading a device would otherwise create a CUDA context on it).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ..samples import DeviceSample, Snapshot
from .base import now

__all__ = ["TorchAllocatorSampler"]


class TorchAllocatorSampler:
    name = "torch"

    def __init__(self, indices: Sequence[int] | None = None, module: Any = None):
        self._indices = list(indices) if indices is not None else None
        self._module = module             # a torch-like module (tests); else sys.modules["torch"]
        self._props: dict[int, tuple[str, int, str | None]] = {}

    def _torch(self) -> Any:
        return self._module if self._module is not None else sys.modules.get("torch")

    def sample(self) -> Snapshot:
        ts = now()
        torch = self._torch()
        if torch is None:
            return Snapshot(timestamp=ts)
        devices: list[DeviceSample] = []
        cuda = torch.cuda
        if cuda.is_available() and cuda.is_initialized():
            indices = self._indices if self._indices is not None else range(cuda.device_count())
            for i in indices:
                name, total, uuid = self._properties(cuda, i)
                devices.append(DeviceSample(
                    device=f"torch:cuda:{i}", name=f"torch allocator on {name}", source=self.name,
                    used_bytes=int(cuda.memory_allocated(i)), reserved_bytes=int(cuda.memory_reserved(i)),
                    peak_bytes=int(cuda.max_memory_allocated(i)), total_bytes=total, uuid=uuid,
                    missing=["utilization_pct", "power_w", "temperature_c", "sm_clock_mhz", "mem_clock_mhz"],
                ))
        mps = getattr(torch, "mps", None)
        backends_mps = getattr(getattr(torch, "backends", None), "mps", None)
        if mps is not None and backends_mps is not None and backends_mps.is_available():
            total = None
            if hasattr(mps, "recommended_max_memory"):
                total = int(mps.recommended_max_memory())
            devices.append(DeviceSample(
                device="torch:mps", name="torch allocator on Apple GPU (MPS)", source=self.name,
                used_bytes=int(mps.current_allocated_memory()),
                reserved_bytes=int(mps.driver_allocated_memory()), total_bytes=total,
                missing=["utilization_pct", "power_w", "temperature_c", "sm_clock_mhz", "mem_clock_mhz"]
                + (["total_bytes"] if total is None else []),
            ))
        return Snapshot(timestamp=ts, devices=devices)

    def _properties(self, cuda: Any, index: int) -> tuple[str, int, str | None]:
        props = self._props.get(index)
        if props is None:
            p = cuda.get_device_properties(index)
            uuid = getattr(p, "uuid", None)
            uuid_text = None
            if uuid is not None:
                uuid_text = str(uuid)
                if not uuid_text.startswith(("GPU-", "MIG-")):
                    uuid_text = f"GPU-{uuid_text}"   # NVML's spelling of the same UUID
            props = (str(p.name), int(p.total_memory), uuid_text)
            self._props[index] = props
        return props

    def close(self) -> None:
        self._props.clear()
