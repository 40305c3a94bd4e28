"""The peak report of a trace file in bounded memory: ``summarize_file(path)`` folds a CSV trace
into a PeakTracker one snapshot at a time, as it is read, so `vramancer report` on a trace of
hundreds of megabytes holds one snapshot and the running peaks, never the whole trace.

It gives what ``analyse(read_trace(path))`` gives. A CSV trace keeps one (innermost) phase per row;
its phase intervals are the runs of consecutive snapshots with one phase, built here as the rows
come, which is exact for a trace in time order (as every writer here writes them). A CSV whose
timestamps go backwards is read again the slow way (whole, sorted), so the answer never depends on
the order of its rows. A JSON trace is parsed whole (at most ``MAX_JSON_TRACE_BYTES``).

For a chart, ``keep=N`` also keeps between N and 2N evenly spaced snapshots (every k-th, k doubling
as the trace grows), so `report --plot` draws a trace of any length in bounded memory too; the
peaks it marks come from the exact report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .export import Trace, iter_csv_snapshots, read_csv, read_json, trace_format
from .peaks import Mark, PeakReport, PeakTracker, PhaseInterval, analyse
from .samples import Snapshot

__all__ = ["TraceSummary", "summarize_file", "MAX_GAPS"]

MAX_GAPS = 64       # distinct "could not sample" lines kept (a trace may repeat one per snapshot)


@dataclass
class TraceSummary:
    """What `vramancer report` shows besides the peaks: where the trace came from and what it missed."""

    path: str
    format: str                     # "csv" | "json"
    samples: int
    interval: float | None = None
    marks: list[Mark] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)   # sorted, at most MAX_GAPS
    streamed: bool = False          # read row by row (a CSV in time order)
    phases: list[PhaseInterval] = field(default_factory=list)
    kept: list[Snapshot] = field(default_factory=list)   # evenly spaced snapshots, with ``keep``

    def chart_trace(self) -> Trace:
        """The kept snapshots as a Trace, for ``plot_trace``."""
        return Trace(snapshots=list(self.kept), phases=list(self.phases), marks=list(self.marks),
                     interval=self.interval, path=self.path, format=self.format)


def _every(snapshots: list[Snapshot], keep: int) -> list[Snapshot]:
    """Between ``keep`` and ``2 * keep`` evenly spaced snapshots of a list (all when it is short)."""
    if not keep:
        return []
    stride = 1
    while len(snapshots) > 2 * keep * stride:
        stride *= 2
    return snapshots[::stride]


def _gaps(found: set[str], missing: list[str]) -> None:
    for m in missing:
        if len(found) >= MAX_GAPS:
            return
        found.add(m)


def summarize_file(path: str | Path, keep: int = 0) -> tuple[TraceSummary, PeakReport]:
    """(summary, peak report) of the trace at ``path``; TraceFileError as ``read_trace`` raises it.
    ``keep``: also keep about that many evenly spaced snapshots (``summary.kept``) for a chart."""
    p = Path(path)
    if trace_format(p) == "json":
        trace = read_json(p)
        gaps: set[str] = set()
        for s in trace.snapshots:
            _gaps(gaps, s.missing)
        report = analyse(trace.snapshots, trace.phases)
        return TraceSummary(path=str(p), format="json", samples=len(trace.snapshots), interval=trace.interval,
                            marks=list(trace.marks), gaps=sorted(gaps), phases=list(trace.phases),
                            kept=_every(sorted(trace.snapshots, key=lambda s: s.timestamp), keep)), report
    tracker = PeakTracker()
    phases: list[PhaseInterval] = []
    name: str | None = None
    start = end = last = None
    gaps = set()
    kept: list[Snapshot] = []
    stride = 1
    for index, snap in enumerate(iter_csv_snapshots(p)):
        t = snap.timestamp
        if last is not None and t < last:       # out of time order: the exact, whole-file way
            trace = read_csv(p)
            for s in trace.snapshots:
                _gaps(gaps, s.missing)
            report = analyse(trace.snapshots, trace.phases)
            return TraceSummary(path=str(p), format="csv", samples=len(trace.snapshots), gaps=sorted(gaps),
                                phases=list(trace.phases),
                                kept=_every(sorted(trace.snapshots, key=lambda s: s.timestamp), keep)), report
        last = t
        if keep and index % stride == 0:
            kept.append(snap)
            if len(kept) >= 2 * keep:       # halve: every other kept one, twice the stride
                kept = kept[::2]
                stride *= 2
        tracker.add(snap)          # its own phase counts; in time order no other interval holds t
        _gaps(gaps, snap.missing)
        if snap.phase != name:     # the runs phases_from_rows makes, as they come
            if name is not None:
                phases.append(PhaseInterval(name=name, start=start, end=end))
            name, start = snap.phase, t
        end = t
    if name is not None:
        phases.append(PhaseInterval(name=name, start=start, end=end))
    report = tracker.report(phases)
    return TraceSummary(path=str(p), format="csv", samples=report.samples, gaps=sorted(gaps),
                        streamed=True, phases=phases, kept=kept), report
