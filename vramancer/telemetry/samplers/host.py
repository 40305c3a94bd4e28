"""Host RAM through psutil: device id "cpu"; used = total - available (what other programs can
still get without swapping), utilization = CPU busy percent since this sampler's previous sample
(None on its first)."""
from __future__ import annotations

import platform
from typing import Any

from ..samples import DeviceSample, Snapshot
from .base import now

__all__ = ["HostSampler"]


class HostSampler:
    name = "host"

    def __init__(self, device: str = "cpu", module: Any = None):
        if module is None:
            import psutil as module

        self._psutil = module             # psutil, or a psutil-like object in tests
        self._device = device
        self._label = f"Host RAM ({platform.machine() or 'host'})"
        self._last: tuple[float, float] | None = self._cpu_times()   # (total, idle) seconds

    def _cpu_times(self) -> tuple[float, float]:
        t = self._psutil.cpu_times()
        # guest time is already counted in user time on Linux (as psutil.cpu_percent does)
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total, t.idle + getattr(t, "iowait", 0.0)

    def _busy_pct(self) -> float | None:
        total, idle = self._cpu_times()
        last, self._last = self._last, (total, idle)
        if last is None or total <= last[0]:
            return None
        return max(0.0, min(100.0, 100.0 * (1.0 - (idle - last[1]) / (total - last[0]))))

    def sample(self) -> Snapshot:
        ts = now()
        vm = self._psutil.virtual_memory()
        busy = self._busy_pct()
        dev = DeviceSample(
            device=self._device, name=self._label, source=self.name,
            used_bytes=int(vm.total - vm.available), total_bytes=int(vm.total), utilization_pct=busy,
            missing=[] if busy is not None else ["utilization_pct"],
        )
        return Snapshot(timestamp=ts, devices=[dev])

    def close(self) -> None:
        pass
