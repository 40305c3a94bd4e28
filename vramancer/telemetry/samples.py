"""Telemetry records: one DeviceSample per device per tick, ProcessSample rows for per-process memory.

Every sampler returns a ``Snapshot``; the Recorder stores snapshots in its ring buffer;
exports, reports and UIs read the Recorder. A field a driver does not support is ``None``
(absent), never NaN; ``missing`` names those fields for the UI to say what is missing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["DeviceSample", "ProcessSample", "Snapshot"]


@dataclass
class DeviceSample:
    device: str                     # stable id: "cuda:0", "rtx3090#0", "cpu", "stage1@rtx3060#0"
    name: str                       # human name: "NVIDIA GeForce RTX 3090"
    source: str                     # sampler: "nvml" | "amdsmi" | "torch" | "host" | "simulated" | "replay"
    used_bytes: int | None = None
    total_bytes: int | None = None
    reserved_bytes: int | None = None   # driver-reserved (NVML v2) or torch allocator reserved
    uuid: str | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    lost: bool = False
    missing: list[str] = field(default_factory=list)
    peak_bytes: int | None = None       # the sampler's own running peak (torch max_memory_allocated)

    @property
    def free_bytes(self) -> int | None:
        if self.used_bytes is None or self.total_bytes is None:
            return None
        return self.total_bytes - self.used_bytes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProcessSample:
    device: str
    pid: int
    used_bytes: int | None
    name: str | None = None         # process name when psutil can read it; None if it vanished

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Snapshot:
    timestamp: float                # time.time() seconds
    devices: list[DeviceSample] = field(default_factory=list)
    processes: list[ProcessSample] = field(default_factory=list)
    phase: str | None = None        # set by the Recorder: the innermost active phase
    missing: list[str] = field(default_factory=list)   # what could not be sampled this tick, one line each

    def to_dict(self) -> dict:
        return {
            "timestamp": self.timestamp,
            "phase": self.phase,
            "devices": [d.to_dict() for d in self.devices],
            "processes": [p.to_dict() for p in self.processes],
            "missing": list(self.missing),
        }
