"""A PNG chart of a trace: memory in use over time per device, the phases shaded, each device's
peak marked. Accelerators, the torch allocator and host RAM get a panel each (only those present),
so host RAM does not flatten the GPU lines. matplotlib's Agg canvas, no pyplot, no global state.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, TraceFileError
from ..units import GiB
from .export import Trace
from .peaks import HOST_SOURCES, PeakReport, analyse

__all__ = ["plot_trace"]

_PANELS = (("GPU memory in use", lambda src: src not in HOST_SOURCES and src != "torch"),
           ("torch allocator (this process)", lambda src: src == "torch"),
           ("host RAM in use", lambda src: src in HOST_SOURCES))


def plot_trace(trace: Trace, path: str | Path, report: PeakReport | None = None, title: str | None = None) -> Path:
    """Draw ``trace`` to the PNG ``path``; returns the path."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir() and str(path.parent):
        raise BadInputError(f"--plot {path}: folder {path.parent} does not exist")
    if not trace.snapshots:
        raise TraceFileError(f"{trace.path or 'trace'}: no samples to plot")
    report = report or analyse(trace.snapshots, trace.phases)
    t0 = min(s.timestamp for s in trace.snapshots)

    # device -> (source, name, xs, ys); device order as first seen
    series: dict[str, tuple[str, str, list[float], list[float]]] = {}
    for s in sorted(trace.snapshots, key=lambda s: s.timestamp):
        for d in s.devices:
            entry = series.setdefault(d.device, (d.source, d.name, [], []))
            if d.used_bytes is not None:
                entry[2].append(s.timestamp - t0)
                entry[3].append(d.used_bytes / GiB)
    panels = [(title_, [dev for dev, (src, *_) in series.items() if want(src)]) for title_, want in _PANELS]
    panels = [(t, devs) for t, devs in panels if devs] or [("memory in use", [])]

    fig = Figure(figsize=(11, 3.2 * len(panels) + 0.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    phase_names = list(dict.fromkeys(p.name for p in trace.phases))
    phase_colors = {name: colormaps["Pastel1"](i % 9) for i, name in enumerate(phase_names)}
    end = max(s.timestamp for s in trace.snapshots) - t0
    for ax, (panel_title, devs) in zip(axes, panels, strict=True):
        for k, iv in enumerate(trace.phases):
            stop = (iv.end if iv.end is not None else t0 + end) - t0
            # nested phases get a shorter band, so the outer one stays visible above them
            ax.axvspan(iv.start - t0, max(stop, iv.start - t0 + 1e-3), ymax=1.0 - 0.06 * min(iv.depth, 5),
                       color=phase_colors[iv.name], alpha=0.55, lw=0, zorder=0)
            if ax is axes[0] and k < 40:
                ax.text(iv.start - t0, 1.0 - 0.06 * min(iv.depth, 5), f" {iv.name}", transform=ax.get_xaxis_transform(),
                        fontsize=7, va="top", ha="left", color="0.3", zorder=1, clip_on=True)
        for m in trace.marks:
            ax.axvline(m.timestamp - t0, color="0.4", lw=0.8, ls=":", zorder=1)
        for k, dev in enumerate(devs):
            source, name, xs, ys = series[dev]
            color = colormaps["tab10"](k % 10)
            ax.plot(xs, ys, color=color, lw=1.6, label=f"{dev} ({name})" if name else dev, zorder=3)
            peak = report.device(dev)
            if peak and peak.peak_used_bytes is not None and peak.peak_timestamp is not None:
                px, py = peak.peak_timestamp - t0, peak.peak_used_bytes / GiB
                ax.plot([px], [py], marker="v", color=color, ms=9, zorder=4)
                ax.annotate(f"peak {py:.2f} GiB" + (f" ({peak.peak_phase})" if peak.peak_phase else ""),
                            (px, py), textcoords="offset points", xytext=(6, 6), fontsize=8, color=color)
                if peak.total_bytes:
                    ax.axhline(peak.total_bytes / GiB, color=color, lw=0.8, ls="--", zorder=2)
            if peak and peak.lost and peak.lost_timestamp is not None:
                ax.axvline(peak.lost_timestamp - t0, color=color, lw=1.2, ls="-.", zorder=2)
                ax.annotate("lost", (peak.lost_timestamp - t0, 0), textcoords="offset points", xytext=(3, 3),
                            fontsize=8, color=color)
        ax.set_title(panel_title, fontsize=10, loc="left")
        ax.set_ylabel("GiB")
        ax.set_ylim(bottom=0)
        ax.grid(True, lw=0.3, alpha=0.6)
        if devs:
            ax.legend(loc="best", fontsize=8, framealpha=0.8)
    axes[-1].set_xlabel("seconds since the start of the trace")
    if phase_names:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=phase_colors[n], alpha=0.5, label=n) for n in phase_names],
                   loc="outside lower center", ncols=min(len(phase_names), 8), fontsize=8, title="phases",
                   title_fontsize=8)
    fig.suptitle(title or f"VRAMancer trace: {Path(trace.path).name if trace.path else ''}", fontsize=11)
    fig.savefig(path, format="png")
    return path
