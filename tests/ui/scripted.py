"""A telemetry Sampler for tests whose readings the test sets between samples."""
from __future__ import annotations

import time

from vramancer.telemetry.samples import DeviceSample, ProcessSample, Snapshot

__all__ = ["ScriptedSampler", "GiB"]

GiB = 2**30


class ScriptedSampler:
    """A telemetry Sampler (``name``, ``sample()``, ``close()``) reporting two GPUs (as a driver would)
    whose used bytes, processes and missing fields the test sets between samples."""

    name = "scripted"

    def __init__(self) -> None:
        self.devices = {
            "rtx3090#0": ("NVIDIA GeForce RTX 3090", 24 * GiB),
            "rtx3060#0": ("NVIDIA GeForce RTX 3060", 12 * GiB),
        }
        self.used = {"rtx3090#0": 6 * GiB, "rtx3060#0": 3 * GiB}
        self.processes = [ProcessSample("rtx3090#0", 4242, 5 * GiB, "python")]
        self.power_w: float | None = None           # None: "not supported" on both GPUs
        self.lost: set[str] = set()
        self._last_timestamp = 0.0

    def sample(self) -> Snapshot:
        devices = []
        for dev, (name, total) in self.devices.items():
            missing = [] if self.power_w is not None else ["power_w"]
            devices.append(DeviceSample(
                device=dev, name=name, source="scripted", used_bytes=None if dev in self.lost else self.used[dev],
                total_bytes=total, utilization_pct=40.0, power_w=self.power_w, temperature_c=61.0,
                lost=dev in self.lost, missing=missing))
        # wall-clock time, strictly increasing from one sample to the next (as a live driver's
        # readings are), whatever the clock's resolution and however fast the test samples
        self._last_timestamp = max(time.time(), self._last_timestamp + 1e-3)
        return Snapshot(timestamp=self._last_timestamp, devices=devices, processes=list(self.processes))

    def close(self) -> None:
        pass
