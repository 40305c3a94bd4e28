"""Host RAM through psutil: device id "cpu"; used = total - available (what other programs can
still get without swapping), utilization = CPU busy percent since the previous sample."""
from __future__ import annotations

import platform

from ..samples import DeviceSample, Snapshot
from .base import now

__all__ = ["HostSampler"]


class HostSampler:
    name = "host"

    def __init__(self, device: str = "cpu"):
        import psutil

        self._psutil = psutil
        self._device = device
        self._label = f"Host RAM ({platform.machine() or 'host'})"
        psutil.cpu_percent(interval=None)   # prime: the first reading is relative to this call

    def sample(self) -> Snapshot:
        ts = now()
        vm = self._psutil.virtual_memory()
        dev = DeviceSample(
            device=self._device, name=self._label, source=self.name,
            used_bytes=int(vm.total - vm.available), total_bytes=int(vm.total),
            utilization_pct=float(self._psutil.cpu_percent(interval=None)),
        )
        return Snapshot(timestamp=ts, devices=[dev])

    def close(self) -> None:
        pass
