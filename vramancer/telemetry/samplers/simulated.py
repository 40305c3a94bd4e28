"""Samples fed by the runtime: when a split model runs on simulated devices, the runtime knows
the bytes it accounted per stage and passes a function returning them as DeviceSamples."""
from __future__ import annotations

from collections.abc import Callable

from ..samples import DeviceSample, Snapshot
from .base import now

__all__ = ["SimulatedSampler"]


class SimulatedSampler:
    name = "simulated"

    def __init__(self, source: Callable[[], list[DeviceSample]], name: str = "simulated"):
        self._source = source
        self.name = name

    def sample(self) -> Snapshot:
        ts = now()
        return Snapshot(timestamp=ts, devices=list(self._source()))

    def close(self) -> None:
        pass
