"""Peak analysis of a recording: per device, per process and per phase, where memory peaked.

    per device   the peak used bytes, when (the earliest sample that reached it), the phase it
                 fell in (the innermost phase of that sample), the total at that sample, the
                 headroom left (total - peak), the peak reserved bytes, whether the device was
                 lost (and when), and the fields it never reported
    per process  (pid, device): the peak used bytes, when, in which phase
    per phase    the largest used bytes on any accelerator while the phase was active (host RAM
                 counts only when no accelerator was sampled), on which device, when, and the
                 phase's total duration; phases rank by that peak

``analyse(snapshots, phases)`` is a pure function; ``PeakTracker`` computes the same thing
incrementally (the Recorder feeds it every sample, so its peaks cover the whole run even after
the ring buffer dropped old samples).
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from .samples import Snapshot

__all__ = ["PhaseInterval", "Mark", "DevicePeak", "ProcessPeak", "PhasePeak", "PeakReport", "PeakTracker",
           "analyse", "HOST_SOURCES"]

# Sources whose memory is host RAM, not an accelerator's.
HOST_SOURCES = frozenset({"host"})


@dataclass(frozen=True)
class PhaseInterval:
    """A named phase: ``end`` is None while it is still open. ``depth``: 0 outermost."""

    name: str
    start: float
    end: float | None = None
    depth: int = 0

    def contains(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t <= self.end)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Mark:
    """An instantaneous event (``rec.mark("first token")``)."""

    name: str
    timestamp: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DevicePeak:
    device: str
    name: str
    source: str
    uuid: str | None
    peak_used_bytes: int | None          # None: the device never reported used bytes
    peak_timestamp: float | None
    peak_phase: str | None
    total_bytes: int | None              # at the peak sample (else the last total seen)
    headroom_bytes: int | None           # total_bytes - peak_used_bytes
    peak_reserved_bytes: int | None
    samples: int
    lost: bool = False
    lost_timestamp: float | None = None
    missing: tuple[str, ...] = ()        # fields this device did not report in some sample

    def to_dict(self) -> dict:
        d = asdict(self)
        d["missing"] = list(self.missing)
        return d


@dataclass(frozen=True)
class ProcessPeak:
    pid: int
    device: str
    name: str | None
    peak_used_bytes: int | None
    peak_timestamp: float | None
    peak_phase: str | None
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PhasePeak:
    name: str
    peak_used_bytes: int | None
    device: str | None
    peak_timestamp: float | None
    samples: int
    duration_s: float | None             # summed over the phase's intervals; None without intervals
    per_device: dict[str, int] = field(default_factory=dict)   # device -> peak used in this phase

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_device"] = dict(self.per_device)
        return d


@dataclass(frozen=True)
class PeakReport:
    samples: int
    start: float | None
    end: float | None
    devices: list[DevicePeak]             # in the order devices first appeared
    processes: list[ProcessPeak]          # largest peak first
    phases: list[PhasePeak]               # largest peak first

    def device(self, device: str) -> DevicePeak | None:
        return next((d for d in self.devices if d.device == device), None)

    def phase(self, name: str) -> PhasePeak | None:
        return next((p for p in self.phases if p.name == name), None)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "start": self.start,
            "end": self.end,
            "devices": [d.to_dict() for d in self.devices],
            "processes": [p.to_dict() for p in self.processes],
            "phases": [p.to_dict() for p in self.phases],
        }


class _DeviceAcc:
    __slots__ = ("device", "name", "source", "uuid", "peak", "peak_ts", "peak_phase", "total_at_peak",
                 "last_total", "peak_reserved", "samples", "lost_ts", "missing")

    def __init__(self, device: str, name: str, source: str):
        self.device, self.name, self.source = device, name, source
        self.uuid: str | None = None
        self.peak: int | None = None
        self.peak_ts: float | None = None
        self.peak_phase: str | None = None
        self.total_at_peak: int | None = None
        self.last_total: int | None = None
        self.peak_reserved: int | None = None
        self.samples = 0
        self.lost_ts: float | None = None
        self.missing: set[str] = set()


class _ProcessAcc:
    __slots__ = ("name", "peak", "peak_ts", "peak_phase", "samples")

    def __init__(self) -> None:
        self.name: str | None = None
        self.peak: int | None = None
        self.peak_ts: float | None = None
        self.peak_phase: str | None = None
        self.samples = 0


class _PhaseAcc:
    __slots__ = ("peak", "device", "peak_ts", "samples", "per_device", "host_only_peak", "host_device",
                 "host_ts")

    def __init__(self) -> None:
        self.peak: int | None = None           # over accelerators
        self.device: str | None = None
        self.peak_ts: float | None = None
        self.samples = 0
        self.per_device: dict[str, int] = {}
        self.host_only_peak: int | None = None  # over host RAM, used when no accelerator was seen
        self.host_device: str | None = None
        self.host_ts: float | None = None


class PeakTracker:
    """Peaks computed one snapshot at a time: ``add(snapshot, active_phases)``, then ``report()``."""

    def __init__(self) -> None:
        self._devices: dict[str, _DeviceAcc] = {}
        self._processes: dict[tuple[int, str], _ProcessAcc] = {}
        self._phases: dict[str, _PhaseAcc] = {}
        self.samples = 0
        self.start: float | None = None
        self.end: float | None = None

    def devices(self) -> list[str]:
        return list(self._devices)

    def device_peak_bytes(self, device: str) -> int | None:
        acc = self._devices.get(device)
        return acc.peak if acc else None

    def add(self, snap: Snapshot, active_phases: Iterable[str] = ()) -> None:
        """Fold one snapshot in. ``active_phases``: every phase active at its time (outer ones
        too); the snapshot's own ``phase`` is added to them."""
        ts = snap.timestamp
        self.samples += 1
        if self.start is None or ts < self.start:
            self.start = ts
        if self.end is None or ts > self.end:
            self.end = ts
        phases = set(active_phases)
        if snap.phase:
            phases.add(snap.phase)
        phase_accs = []
        for name in phases:
            acc = self._phases.get(name)
            if acc is None:
                acc = self._phases[name] = _PhaseAcc()
            acc.samples += 1
            phase_accs.append(acc)
        for d in snap.devices:
            acc = self._devices.get(d.device)
            if acc is None:
                acc = self._devices[d.device] = _DeviceAcc(d.device, d.name, d.source)
            acc.samples += 1
            if d.uuid:
                acc.uuid = d.uuid
            if d.name:
                acc.name = d.name
            if d.missing:
                acc.missing.update(d.missing)
            if d.lost and acc.lost_ts is None:
                acc.lost_ts = ts
            if d.total_bytes is not None:
                acc.last_total = d.total_bytes
            if d.reserved_bytes is not None and (acc.peak_reserved is None or d.reserved_bytes > acc.peak_reserved):
                acc.peak_reserved = d.reserved_bytes
            used = d.used_bytes
            if used is None:
                continue
            if acc.peak is None or used > acc.peak:
                acc.peak, acc.peak_ts, acc.peak_phase, acc.total_at_peak = used, ts, snap.phase, d.total_bytes
            host = d.source in HOST_SOURCES
            for pacc in phase_accs:
                prev = pacc.per_device.get(d.device)
                if prev is None or used > prev:
                    pacc.per_device[d.device] = used
                if host:
                    if pacc.host_only_peak is None or used > pacc.host_only_peak:
                        pacc.host_only_peak, pacc.host_device, pacc.host_ts = used, d.device, ts
                elif pacc.peak is None or used > pacc.peak:
                    pacc.peak, pacc.device, pacc.peak_ts = used, d.device, ts
        for p in snap.processes:
            key = (p.pid, p.device)
            acc = self._processes.get(key)
            if acc is None:
                acc = self._processes[key] = _ProcessAcc()
            acc.samples += 1
            if p.name:
                acc.name = p.name
            if p.used_bytes is not None and (acc.peak is None or p.used_bytes > acc.peak):
                acc.peak, acc.peak_ts, acc.peak_phase = p.used_bytes, ts, snap.phase

    def report(self, phases: Sequence[PhaseInterval] = ()) -> PeakReport:
        durations: dict[str, float] = {}
        for iv in phases:
            end = iv.end if iv.end is not None else (self.end if self.end is not None else iv.start)
            durations[iv.name] = durations.get(iv.name, 0.0) + max(0.0, end - iv.start)
        devices = []
        for a in self._devices.values():
            total = a.total_at_peak if a.total_at_peak is not None else a.last_total
            headroom = total - a.peak if total is not None and a.peak is not None else None
            devices.append(DevicePeak(
                device=a.device, name=a.name, source=a.source, uuid=a.uuid, peak_used_bytes=a.peak,
                peak_timestamp=a.peak_ts, peak_phase=a.peak_phase, total_bytes=total, headroom_bytes=headroom,
                peak_reserved_bytes=a.peak_reserved, samples=a.samples, lost=a.lost_ts is not None,
                lost_timestamp=a.lost_ts, missing=tuple(sorted(a.missing)),
            ))
        processes = [
            ProcessPeak(pid=pid, device=device, name=a.name, peak_used_bytes=a.peak, peak_timestamp=a.peak_ts,
                        peak_phase=a.peak_phase, samples=a.samples)
            for (pid, device), a in self._processes.items()
        ]
        processes.sort(key=lambda p: (-(p.peak_used_bytes or -1), p.pid, p.device))
        phase_peaks = []
        names = list(self._phases) + [n for n in durations if n not in self._phases]
        for name in names:
            a = self._phases.get(name) or _PhaseAcc()
            if a.peak is not None:
                peak, device, ts = a.peak, a.device, a.peak_ts
            else:
                peak, device, ts = a.host_only_peak, a.host_device, a.host_ts
            phase_peaks.append(PhasePeak(name=name, peak_used_bytes=peak, device=device, peak_timestamp=ts,
                                         samples=a.samples, duration_s=durations.get(name),
                                         per_device=dict(a.per_device)))
        phase_peaks.sort(key=lambda p: (-(p.peak_used_bytes if p.peak_used_bytes is not None else -1), p.name))
        return PeakReport(samples=self.samples, start=self.start, end=self.end, devices=devices,
                          processes=processes, phases=phase_peaks)


def analyse(snapshots: Sequence[Snapshot], phases: Sequence[PhaseInterval] = ()) -> PeakReport:
    """The peak report of ``snapshots`` with the phase ``intervals`` (open ones run to the end).

    A snapshot belongs to every phase whose interval contains its timestamp, and to its own
    ``phase`` (so a CSV trace, which keeps only the innermost phase per row, still works)."""
    tracker = PeakTracker()
    ordered = sorted(snapshots, key=lambda s: s.timestamp)
    by_start = sorted(phases, key=lambda iv: iv.start)
    open_heap: list[tuple[float, int, str]] = []   # (end, order, name) of intervals started so far
    i = 0
    for snap in ordered:
        t = snap.timestamp
        while i < len(by_start) and by_start[i].start <= t:
            iv = by_start[i]
            heapq.heappush(open_heap, (iv.end if iv.end is not None else math.inf, i, iv.name))
            i += 1
        while open_heap and open_heap[0][0] < t:
            heapq.heappop(open_heap)
        tracker.add(snap, {name for _, _, name in open_heap})
    return tracker.report(phases)
