"""What the live views show, as plain text and numbers: shared by the TUI, the web page and the Qt window.

No UI toolkit is imported here; each view turns these strings and rows into its own widgets.
A field a driver does not give is said in words ("power: n/a (not supported)"), never hidden
and never a crash.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..telemetry.samples import DeviceSample, ProcessSample, Snapshot
from ..units import GiB, iso_time

__all__ = [
    "DETAIL_FIELDS",
    "DeviceView",
    "device_view",
    "gib_text",
    "used_fraction",
    "detail_texts",
    "process_rows",
    "PROCESS_HEADERS",
    "PEAK_HEADERS",
    "no_process_text",
    "peak_rows",
    "top_phase_rows",
    "top_process_text",
    "process_table_rows",
    "peaks_summary",
    "display_dict",
    "sample_line",
    "history_blocks",
    "iso_time",
]

# (field on DeviceSample, label, format of the value)
DETAIL_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("utilization_pct", "util", "{:.0f}%"),
    ("power_w", "power", "{:.0f} W"),
    ("temperature_c", "temp", "{:.0f} °C"),
    ("sm_clock_mhz", "sm clock", "{:.0f} MHz"),
    ("mem_clock_mhz", "mem clock", "{:.0f} MHz"),
)


def gib_text(n_bytes: int | None, precision: int = 2) -> str:
    """Bytes as GiB without the unit ("12.34"); "n/a" when absent."""
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / GiB:.{precision}f}"


def used_fraction(sample: DeviceSample) -> float | None:
    """used / total in [0, 1], or None when either is absent (or total is 0)."""
    if sample.used_bytes is None or not sample.total_bytes:
        return None
    return max(0.0, min(1.0, sample.used_bytes / sample.total_bytes))


def _why_absent(sample: DeviceSample, field_name: str) -> str:
    if sample.lost:
        return "n/a (device lost)"
    if field_name in sample.missing:
        return "n/a (simulated)" if sample.source == "simulated" else "n/a (not supported)"
    return "n/a"


def detail_texts(sample: DeviceSample) -> list[str]:
    """The optional fields: those present one by one ("util 45%"), then those absent grouped
    by why ("power, temp: n/a (not supported)")."""
    present: list[str] = []
    absent: dict[str, list[str]] = {}
    for field_name, label, fmt in DETAIL_FIELDS:
        value = getattr(sample, field_name, None)
        if value is None:
            absent.setdefault(_why_absent(sample, field_name), []).append(label)
        else:
            present.append(f"{label} {fmt.format(value)}")
    return present + [f"{', '.join(labels)}: {why}" for why, labels in absent.items()]


@dataclass(frozen=True)
class DeviceView:
    """One device as the views show it."""

    device: str             # id: "cuda:0", "rtx3090#0"
    title: str              # "rtx3090#0  NVIDIA GeForce RTX 3090  [simulated]"
    usage: str              # "12.34 / 24.00 GiB (51%)" or "used: n/a (not supported)"
    fraction: float | None  # used / total, None when unknown
    details: tuple[str, ...]
    lost: bool


def device_view(sample: DeviceSample) -> DeviceView:
    title = f"{sample.device}  {sample.name}"
    if sample.source and sample.source not in ("nvml", "amdsmi"):
        title += f"  [{sample.source}]"
    if sample.lost:
        title += "  LOST"
    fraction = used_fraction(sample)
    if sample.used_bytes is None:
        usage = f"used: {_why_absent(sample, 'used_bytes')}"
        if sample.total_bytes is not None:
            usage += f"  (total {gib_text(sample.total_bytes)} GiB)"
    elif sample.total_bytes is None:
        usage = f"{gib_text(sample.used_bytes)} GiB used, total: {_why_absent(sample, 'total_bytes')}"
    else:
        pct = f" ({fraction * 100:.0f}%)" if fraction is not None else ""
        usage = f"{gib_text(sample.used_bytes)} / {gib_text(sample.total_bytes)} GiB{pct}"
    return DeviceView(sample.device, title, usage, fraction, tuple(detail_texts(sample)), sample.lost)


PROCESS_HEADERS = ("pid", "name", "device", "used GiB")
PEAK_HEADERS = ("device", "peak GiB", "at", "phase", "headroom GiB")


def process_rows(processes: Iterable[ProcessSample]) -> list[tuple[str, str, str, str]]:
    """(pid, name, device, used GiB) per process (``PROCESS_HEADERS``), largest first; unknown
    values said as such."""
    rows = sorted(processes, key=lambda p: (p.used_bytes is None, -(p.used_bytes or 0), p.pid))
    return [
        (str(p.pid), p.name or "(gone)", p.device,
         gib_text(p.used_bytes) if p.used_bytes is not None else "n/a (not reported)")
        for p in rows
    ]


def no_process_text(snapshot: Snapshot | None) -> str:
    """What the process table says when it has no rows."""
    if snapshot is None:
        return "no sample yet"
    if any("processes" in d.missing for d in snapshot.devices):
        return "per-process memory: n/a (not supported)"
    return "no process reported"


def _get(d: Any, key: str, default: Any = None) -> Any:
    return d.get(key, default) if isinstance(d, dict) else default


def peak_rows(peaks: dict) -> list[tuple[str, str, str, str, str]]:
    """(device, peak GiB, when, phase, headroom GiB) per device (``PEAK_HEADERS``) from
    ``PeakReport.to_dict()``."""
    rows = []
    for item in _get(peaks, "devices", []) or []:
        peak = _get(item, "peak_used_bytes")
        when = _get(item, "peak_timestamp")
        headroom = _get(item, "headroom_bytes")
        device = str(_get(item, "device", "?")) + (" (lost)" if _get(item, "lost") else "")
        rows.append((
            device,
            gib_text(peak) if peak is not None else "n/a (never reported)",
            iso_time(when)[11:] if isinstance(when, (int, float)) else "-",
            str(_get(item, "peak_phase") or "-"),
            gib_text(headroom) if headroom is not None else "n/a",
        ))
    return rows


def top_phase_rows(peaks: dict, limit: int = 5) -> list[tuple[str, str]]:
    """(phase, "peak GiB on device") for the phases with the highest peaks (``PeakReport.to_dict()``
    lists them largest first)."""
    rows = []
    for item in (_get(peaks, "phases", []) or [])[:limit]:
        peak = _get(item, "peak_used_bytes")
        where = f" on {_get(item, 'device')}" if _get(item, "device") else ""
        rows.append((str(_get(item, "name", "?")), f"{gib_text(peak)} GiB{where}" if peak is not None else "n/a"))
    return rows


def process_table_rows(snapshot: Snapshot) -> list[tuple[str, str, str, str]]:
    """``process_rows``, or one row saying why there are none."""
    return process_rows(snapshot.processes) or [("-", no_process_text(snapshot), "", "")]


def peaks_summary(peaks: dict) -> str:
    """The lines under the peaks table: the top phases and the top process (either may be absent)."""
    lines = []
    phases = top_phase_rows(peaks)
    if phases:
        lines.append("top phases: " + ", ".join(f"{name} {peak}" for name, peak in phases))
    top_process = top_process_text(peaks)
    if top_process:
        lines.append("top process: " + top_process)
    return "\n".join(lines)


def top_process_text(peaks: dict) -> str:
    """The process with the highest peak: "pid 1234 python: 8.00 GiB on cuda:0 (decode)", or ""."""
    for item in _get(peaks, "processes", []) or []:
        peak = _get(item, "peak_used_bytes")
        if peak is None:
            continue
        phase = f" ({_get(item, 'peak_phase')})" if _get(item, "peak_phase") else ""
        return (f"pid {_get(item, 'pid')} {_get(item, 'name') or '(gone)'}: {gib_text(peak)} GiB "
                f"on {_get(item, 'device')}{phase}")
    return ""


def display_dict(snapshot: Snapshot | None, peaks: dict | None = None) -> dict:
    """What a view shows for ``snapshot`` (and ``peaks`` when given), as JSON-ready texts:
    {"devices": {id: {"title", "usage", "fraction", "details"}}, "processes": [[pid, name, device, used]],
     "no_processes": text, "missing": [line, ...], "peaks": [[device, peak, at, phase, headroom]],
     "summary": text}."""
    out: dict[str, Any] = {"devices": {}, "processes": []}
    if snapshot is not None:
        for sample in snapshot.devices:
            v = device_view(sample)
            out["devices"][v.device] = {"title": v.title, "usage": v.usage, "fraction": v.fraction,
                                        "details": list(v.details), "lost": v.lost}
        out["processes"] = [list(r) for r in process_rows(snapshot.processes)]
        out["no_processes"] = no_process_text(snapshot)
        out["missing"] = list(getattr(snapshot, "missing", []) or [])
    if peaks is not None:
        out["peaks"] = [list(r) for r in peak_rows(peaks)]
        out["summary"] = peaks_summary(peaks)
    return out


def sample_line(snapshot: Snapshot) -> str:
    """One log line per sample: "<iso time> <id> <used>/<total> GiB | ..." (phase last, if any)."""
    parts = []
    for d in snapshot.devices:
        if d.lost:
            parts.append(f"{d.device} LOST")
        else:
            parts.append(f"{d.device} {gib_text(d.used_bytes)}/{gib_text(d.total_bytes)} GiB")
    line = f"{iso_time(snapshot.timestamp)} " + (" | ".join(parts) if parts else "no devices")
    if snapshot.phase:
        line += f" phase={snapshot.phase}"
    return line


_BLOCKS = " ▁▂▃▄▅▆▇█"


def history_blocks(values: Iterable[float], top: float, width: int, height: int = 2) -> list[str]:
    """A fixed-scale sparkline: one column per value (newest at the right, the last ``width``),
    0 at the bottom and ``top`` at the top, ``height`` rows of eighth blocks. Rows top first."""
    vals = list(values)[-width:] if width > 0 else []
    levels = [0 if top <= 0 else round(max(0.0, min(1.0, v / top)) * height * 8) for v in vals]
    pad = " " * (max(width, 0) - len(vals))
    rows = []
    for r in range(height):
        floor = (height - 1 - r) * 8          # eighths below this row
        rows.append(pad + "".join(_BLOCKS[max(0, min(8, lv - floor))] for lv in levels))
    return rows
