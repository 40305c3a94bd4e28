"""`vramancer report FILE [--json] [--plot out.png]`: the peak analysis of a recorded trace
(CSV or JSON, as `monitor --export` / `Recorder.to_csv` / `to_json` write them) and a chart.

A missing, truncated or malformed file exits 2 with one line (TraceFileError)."""
from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["configure", "main", "render_report", "PLOT_SAMPLES"]

PLOT_SAMPLES = 5000     # a chart draws at most about twice this many snapshots (more would not show)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a trace recorded as .csv or .json")
    parser.add_argument("--json", action="store_true", help="print the peak report as JSON")
    parser.add_argument("--plot", metavar="PNG", help="draw memory over time per device, phases shaded, to PNG")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="processes and phases to list (default 10)")


def main(args: argparse.Namespace) -> int:
    from ..errors import BadInputError

    if args.top < 1:
        raise BadInputError(f"--top must be at least 1, got {args.top}")
    from .summary import summarize_file

    if args.plot:   # refused before the trace is read, not after
        from .._io import check_writable

        check_writable(args.plot, "--plot")
    # row by row: a trace of any size in bounded memory (the chart from evenly spaced samples)
    trace, report = summarize_file(args.file, keep=PLOT_SAMPLES if args.plot else 0)
    if args.plot:
        from .plot import plot_trace

        plot_trace(trace.chart_trace(), args.plot, report)
    if args.json:
        doc = report.to_dict()
        doc["trace"] = {"path": trace.path, "format": trace.format, "interval": trace.interval,
                        "marks": [m.to_dict() for m in trace.marks]}
        if args.plot:
            doc["plot"] = str(args.plot)
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_report(trace, report, top=args.top)
        if args.plot:
            print(f"chart written to {args.plot}")
    return 0


def _bytes(n: int | None) -> str:
    from ..units import format_bytes

    return "-" if n is None else format_bytes(n, 1)


def _at(ts: float | None, t0: float | None) -> str:
    if ts is None or t0 is None:
        return "-"
    return f"+{ts - t0:.2f} s"


def _table(title: str, *columns: tuple[str, str]):
    from rich import box
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in columns:
        t.add_column(name, justify=justify, no_wrap=True)
    return t


def render_report(trace, report, top: int = 10, console=None) -> None:
    """Print the peak report as rich tables. ``trace``: a Trace, or the TraceSummary of a streamed file."""
    from rich.console import Console

    console = console or Console()
    t0 = report.start
    span = (report.end - report.start) if report.start is not None and report.end is not None else 0.0
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)) if t0 is not None else "-"
    except (OverflowError, ValueError, OSError):   # a timestamp no calendar holds: shown as it is
        started = f"t={t0:g}"
    interval = f", interval {trace.interval:g} s" if trace.interval else ""
    console.print(f"[bold]{trace.path}[/bold]: {report.samples} samples over {span:.1f} s from {started}{interval}")
    if not report.samples:
        console.print("the trace has no samples")
        return

    show_reserved = any(d.peak_reserved_bytes is not None for d in report.devices)
    t = _table("Peak memory per device")
    t.add_column("device", overflow="ellipsis", min_width=23, max_width=30)
    for col in ("peak used", "total", "headroom") + (("reserved",) if show_reserved else ()) + ("at",):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("phase", overflow="ellipsis", max_width=14)
    notes = []
    for d in report.devices:
        row = [f"{d.device}\n[dim]{d.name}[/dim]" if d.name and d.name != d.device else d.device,
               _bytes(d.peak_used_bytes), _bytes(d.total_bytes), _bytes(d.headroom_bytes)]
        if show_reserved:
            row.append(_bytes(d.peak_reserved_bytes))
        t.add_row(*row, _at(d.peak_timestamp, t0), d.peak_phase or "-")
        if d.lost:
            notes.append(f"[red]{d.device} was lost at {_at(d.lost_timestamp, t0)}[/red]")
        if d.missing:
            notes.append(f"{d.device} did not report: {', '.join(d.missing)}")
    console.print(t)
    for line in notes:
        console.print(line)

    if report.processes:
        t = _table("Peak memory per process", ("pid", "right"), ("process", "left"), ("device", "left"),
                   ("peak used", "right"), ("at", "right"), ("phase", "left"))
        for p in report.processes[:top]:
            t.add_row(str(p.pid), p.name or "(gone)", p.device, _bytes(p.peak_used_bytes),
                      _at(p.peak_timestamp, t0), p.peak_phase or "-")
        console.print(t)

    if report.phases:
        t = _table("Phases by peak", ("phase", "left"), ("peak used", "right"), ("on", "left"), ("at", "right"),
                   ("duration", "right"), ("samples", "right"))
        for ph in report.phases[:top]:
            t.add_row(ph.name, _bytes(ph.peak_used_bytes), ph.device or "-", _at(ph.peak_timestamp, t0),
                      f"{ph.duration_s:.2f} s" if ph.duration_s is not None else "-", str(ph.samples))
        console.print(t)
    gaps = trace.gaps if hasattr(trace, "gaps") else sorted({m for s in trace.snapshots for m in s.missing})
    if gaps:
        console.print("[yellow]not sampled:[/yellow] " + "; ".join(gaps[:5]) + (" ..." if len(gaps) > 5 else ""))
