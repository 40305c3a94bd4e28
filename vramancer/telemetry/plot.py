"""A PNG chart of a trace: memory in use over time per device, the phases shaded, each device's
peak marked. Accelerators, the torch allocator and host RAM get a panel each (only those present),
so host RAM does not flatten the GPU lines. matplotlib's Agg canvas, no pyplot, no global state.

What keeps it readable:
  - the y axis fits the data (a card used at 1 % is not drawn against its full 24 GiB); a card's
    capacity is the dashed line of its colour, in the legend, drawn when it is near the data
    (within 2x of it) and said "off the chart" in the legend otherwise; MiB (KiB) when a panel
    stays under 1 GiB (1 MiB);
  - the device legend sits outside the plot, right of it; phase names are in the legend below
    and written on a band only where they fit without touching another label (rows staggered);
  - peak labels are placed where they stay inside the axes and touch no other label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TraceFileError
from ..units import GiB, MiB, format_bytes
from .export import Trace
from .peaks import HOST_SOURCES, PeakReport, analyse

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_trace", "render_trace", "ChartPanel", "Chart"]

_PANELS = (("GPU memory in use", lambda src: src not in HOST_SOURCES and src != "torch"),
           ("torch allocator (this process)", lambda src: src == "torch"),
           ("host RAM in use", lambda src: src in HOST_SOURCES))
_PHASE_ROWS = 3            # staggered rows of phase labels at the top of a panel
_ROW_HEIGHT = 0.075        # of the axes height, per row
_UNITS = (("GiB", GiB), ("MiB", MiB), ("KiB", 1024))   # a panel counts in the largest its data reaches
_TOTAL_NEAR = 2.0          # a capacity line is drawn when it is at most this many times the data's top


@dataclass
class ChartPanel:
    """One drawn panel: its axes, devices, the unit its y axis counts in, and its labels."""

    title: str
    devices: list[str]
    axes: Any
    unit: str                                   # "GiB" | "MiB" | "KiB"
    unit_bytes: int
    data_top: float                             # largest used value drawn, in ``unit``
    totals_drawn: list[str] = field(default_factory=list)     # devices whose dashed capacity line shows
    phase_labels: list[Any] = field(default_factory=list)     # matplotlib Text
    peak_labels: list[Any] = field(default_factory=list)      # matplotlib Text


@dataclass
class Chart:
    figure: Figure
    panels: list[ChartPanel]


def _overlaps(box: Any, placed: list[Any]) -> bool:
    return any(box.overlaps(other) for other in placed)


def _inside(box: Any, frame: Any) -> bool:
    return box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def render_trace(trace: Trace, report: PeakReport | None = None, title: str | None = None) -> Chart:
    """The chart of ``trace`` as a matplotlib Figure (Agg canvas, drawn), with what each panel holds."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not trace.snapshots:
        raise TraceFileError(f"{trace.path or 'trace'}: no samples to plot")
    report = report or analyse(trace.snapshots, trace.phases)
    t0 = min(s.timestamp for s in trace.snapshots)

    # device -> (source, name, xs, used bytes); device order as first seen
    series: dict[str, tuple[str, str, list[float], list[int]]] = {}
    for s in sorted(trace.snapshots, key=lambda s: s.timestamp):
        for d in s.devices:
            entry = series.setdefault(d.device, (d.source, d.name, [], []))
            if d.used_bytes is not None:
                entry[2].append(s.timestamp - t0)
                entry[3].append(d.used_bytes)
    groups = [(t, [dev for dev, (src, *_) in series.items() if want(src)]) for t, want in _PANELS]
    groups = [(t, devs) for t, devs in groups if devs] or [("memory in use", [])]

    fig = Figure(figsize=(12, 3.4 * len(groups) + 0.9), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    phase_names = list(dict.fromkeys(p.name for p in trace.phases))
    phase_colors = {name: colormaps["Pastel1"](i % 9) for i, name in enumerate(phase_names)}
    end = max(s.timestamp for s in trace.snapshots) - t0
    label_rows = _PHASE_ROWS if trace.phases else 0
    panels: list[ChartPanel] = []
    for ax, (panel_title, devs) in zip(axes, groups, strict=True):
        top_bytes = max((max(series[d][3]) for d in devs if series[d][3]), default=0)
        unit, unit_bytes = next(((u, b) for u, b in _UNITS if top_bytes >= b), _UNITS[-1])
        panel = ChartPanel(panel_title, devs, ax, unit, unit_bytes, top_bytes / unit_bytes)
        panels.append(panel)
        handles: list[Any] = []
        limit = panel.data_top
        for k, dev in enumerate(devs):
            source, name, xs, ys = series[dev]
            color = colormaps["tab10"](k % 10)
            (line,) = ax.plot(xs, [y / unit_bytes for y in ys], color=color, lw=1.6, zorder=3,
                              label=f"{dev} ({name})" if name and name != dev else dev)
            handles.append(line)
            peak = report.device(dev)
            total = peak.total_bytes if peak and peak.total_bytes else None
            if total is not None:
                total_units = total / unit_bytes
                near = total_units <= _TOTAL_NEAR * max(panel.data_top, 1e-9)
                if near:
                    ax.axhline(total_units, color=color, lw=0.9, ls="--", zorder=2)
                    panel.totals_drawn.append(dev)
                    limit = max(limit, total_units)
                handles.append(Line2D([], [], color=color, lw=0.9, ls="--",
                                      label=f"{dev} capacity {format_bytes(total)}"
                                            + ("" if near else " (off the chart)")))
            if peak and peak.lost and peak.lost_timestamp is not None:
                ax.axvline(peak.lost_timestamp - t0, color=color, lw=1.2, ls="-.", zorder=2)
        for iv in trace.phases:
            stop = (iv.end if iv.end is not None else t0 + end) - t0
            # nested phases get a shorter band, so the outer one stays visible above them
            ax.axvspan(iv.start - t0, max(stop, iv.start - t0 + 1e-3), ymax=1.0 - 0.04 * min(iv.depth, 5),
                       color=phase_colors[iv.name], alpha=0.55, lw=0, zorder=0)
        for m in trace.marks:
            ax.axvline(m.timestamp - t0, color="0.4", lw=0.8, ls=":", zorder=1)
        # headroom: the phase label rows sit above the data, the data's top in the upper part
        headroom = 1.0 - _ROW_HEIGHT * label_rows - 0.04
        ax.set_ylim(0, (limit if limit > 0 else 1.0) / headroom)
        ax.set_xlim(-0.01 * max(end, 1e-3), end * 1.01 + 1e-3)
        ax.set_title(panel_title, fontsize=10, loc="left")
        ax.set_ylabel(unit)
        ax.grid(True, lw=0.3, alpha=0.6)
        if devs:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                      framealpha=0.9, borderaxespad=0.0)
    axes[-1].set_xlabel("seconds since the start of the trace")
    if phase_names:
        fig.legend(handles=[Patch(color=phase_colors[n], alpha=0.55, label=n) for n in phase_names],
                   loc="outside lower center", ncols=min(len(phase_names), 8), fontsize=8, title="phases",
                   title_fontsize=8)
    fig.suptitle(title or f"VRAMancer trace: {Path(trace.path).name if trace.path else ''}", fontsize=11)
    canvas.draw()           # the layout is final: now labels can be measured and placed
    renderer = canvas.get_renderer()
    for panel in panels:
        _place_labels(panel, trace, report, t0, renderer, colormaps["tab10"])
    canvas.draw()
    return Chart(fig, panels)


def _place_labels(panel: ChartPanel, trace: Trace, report: PeakReport, t0: float, renderer: Any,
                  palette: Any) -> None:
    """Phase names on their bands (staggered rows, dropped where they would touch another label:
    the legend names every phase) and each device's peak label, inside the axes, touching nothing."""
    ax = panel.axes
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    rows_right: list[float] = [frame.x0] * _PHASE_ROWS
    for iv in sorted(trace.phases, key=lambda p: (p.start, p.depth)):
        x = iv.start - t0
        for row in range(_PHASE_ROWS):
            text = ax.text(x, 1.0 - 0.02 - _ROW_HEIGHT * row, f" {iv.name}", transform=ax.get_xaxis_transform(),
                           fontsize=7, va="top", ha="left", color="0.25", zorder=5)
            box = text.get_window_extent(renderer)
            if box.x0 >= rows_right[row] and _inside(box, frame) and not _overlaps(box, placed):
                rows_right[row] = box.x1 + 2
                placed.append(box)
                panel.phase_labels.append(text)
                break
            text.remove()
    for k, dev in enumerate(panel.devices):
        peak = report.device(dev)
        if not peak or peak.peak_used_bytes is None or peak.peak_timestamp is None:
            continue
        color = palette(k % 10)
        px, py = peak.peak_timestamp - t0, peak.peak_used_bytes / panel.unit_bytes
        ax.plot([px], [py], marker="v", color=color, ms=9, zorder=4)
        label = f"peak {py:,.2f} {panel.unit}" + (f" ({peak.peak_phase})" if peak.peak_phase else "")
        candidates = [(6, 6, "left", "bottom"), (-6, 6, "right", "bottom"), (6, -8, "left", "top"),
                      (-6, -8, "right", "top"), (-6, 18, "right", "bottom"), (6, 18, "left", "bottom"),
                      (-6, -22, "right", "top"), (6, -22, "left", "top")]
        chosen = None
        for dx, dy, ha, va in candidates:
            text = ax.annotate(label, (px, py), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               color=color, ha=ha, va=va, zorder=6,
                               bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
            box = text.get_window_extent(renderer)
            if _inside(box, frame) and not _overlaps(box, placed):
                chosen = text
                placed.append(box)
                break
            text.remove()
        if chosen is None:       # crowded: the first place that stays inside, overlap or not
            for dx, dy, ha, va in candidates:
                text = ax.annotate(label, (px, py), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                                   color=color, ha=ha, va=va, zorder=6,
                                   bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
                if _inside(text.get_window_extent(renderer), frame):
                    chosen = text
                    break
                text.remove()
        if chosen is not None:
            panel.peak_labels.append(chosen)
        if peak.lost and peak.lost_timestamp is not None:
            ax.annotate("lost", (peak.lost_timestamp - t0, 0), textcoords="offset points", xytext=(3, 3),
                        fontsize=8, color=color)


def plot_trace(trace: Trace, path: str | Path, report: PeakReport | None = None, title: str | None = None) -> Path:
    """Draw ``trace`` to the PNG ``path``; returns the path."""
    from .._io import atomic_open, check_writable

    path = Path(path)
    check_writable(path, "--plot")
    chart = render_trace(trace, report, title)
    with atomic_open(path, "wb", flag="--plot") as f:   # a device node is written, never replaced
        chart.figure.savefig(f, format="png")
    return path
