"""`report --plot`: the chart is rendered for real and probed: sizes, where the data lands in the
plot area (pixels of the PNG), the y axis fitted to the data, the capacity lines in the legend,
phase and peak labels inside the axes and never on top of each other. The PNGs are kept under
artifacts/screenshots for a person to look at."""
from __future__ import annotations

import itertools

import pytest

from vramancer.telemetry.export import Trace, write_json
from vramancer.telemetry.peaks import Mark, PhaseInterval
from vramancer.telemetry.samples import DeviceSample, Snapshot

pytest.importorskip("matplotlib")

GiB = 2**30
T0 = 1_700_000_000.0
ORANGE = (1.0, 0.498, 0.055)       # tab10 #2: the second device of a panel


def _hard_trace() -> Trace:
    """A 24 GiB card used at 1 %, a 12 GiB card nearly full with its peak at the right edge, host
    RAM, phases a few pixels apart (labels would collide), nested phases and a mark."""
    snaps = []
    for i in range(101):
        a = int((0.2 + 0.1 * i / 100) * GiB)
        b = int((2 + 9.5 * (i / 100) ** 2) * GiB)
        snaps.append(Snapshot(T0 + i * 0.1, [
            DeviceSample("cuda:0", "NVIDIA GeForce RTX 3090", "nvml", a, 24 * GiB),
            DeviceSample("cuda:1", "NVIDIA GeForce RTX 3060", "nvml", b, 12 * GiB),
            DeviceSample("cpu", "Host RAM", "host", int((20 + i * 0.01) * GiB), 64 * GiB)]))
    phases = [PhaseInterval("load", T0, T0 + 2.0), PhaseInterval("prefill", T0 + 2.0, T0 + 2.3),
              PhaseInterval("decode", T0 + 2.3, T0 + 2.5), PhaseInterval("decode-step-warmup", T0 + 2.5, T0 + 2.6),
              PhaseInterval("generate", T0 + 2.6, T0 + 10.0), PhaseInterval("chunk", T0 + 3.0, T0 + 3.1, depth=1),
              PhaseInterval("chunk", T0 + 3.15, T0 + 3.3, depth=1)]
    return Trace(snaps, phases, [Mark("first token", T0 + 2.3)], 0.1, path="hard.json", format="json")


def _boxes(texts, renderer):
    return [t.get_window_extent(renderer) for t in texts]


def _check_labels(chart) -> None:
    renderer = chart.figure.canvas.get_renderer()
    for panel in chart.panels:
        frame = panel.axes.get_window_extent(renderer)
        boxes = _boxes(panel.phase_labels + panel.peak_labels, renderer)
        for box in boxes:          # inside the axes
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)


def _near_colour(image, x: float, y: float, colour: tuple[float, float, float], radius: int = 4) -> bool:
    h = image.shape[0]
    row, col = int(round(h - y)), int(round(x))
    window = image[max(0, row - radius):row + radius + 1, max(0, col - radius):col + radius + 1, :3]
    return bool((abs(window - colour).max(axis=-1) < 0.08).any())


def test_hard_trace_fits_the_data_and_labels_never_collide(screenshots):
    from matplotlib.image import imread

    from vramancer.telemetry.plot import plot_trace, render_trace

    chart = render_trace(_hard_trace())
    assert [p.title for p in chart.panels] == ["GPU memory in use", "host RAM in use"]
    gpu, host = chart.panels
    assert gpu.unit == "GiB" and gpu.data_top == pytest.approx(11.5)
    top = gpu.axes.get_ylim()[1]
    assert 12.0 <= top < 17.0                 # the 3060's 12 GiB is shown, the 3090's 24 GiB is not
    assert gpu.totals_drawn == ["cuda:1"] and host.totals_drawn == []
    legend = [t.get_text() for t in gpu.axes.get_legend().get_texts()]
    assert legend == ["cuda:0 (NVIDIA GeForce RTX 3090)", "cuda:0 capacity 24.0 GiB (off the chart)",
                      "cuda:1 (NVIDIA GeForce RTX 3060)", "cuda:1 capacity 12.0 GiB"]
    styles = [h.get_linestyle() for h in gpu.axes.get_legend().legend_handles]
    assert styles == ["-", "--", "-", "--"]
    assert 20.0 < host.axes.get_ylim()[1] < 30.0          # 21 GiB of 64: not drawn against 64
    _check_labels(chart)
    names = [t.get_text().strip() for t in gpu.phase_labels]
    assert {"load", "prefill", "decode", "decode-step-warmup", "generate"} <= set(names)

    png = plot_trace(_hard_trace(), screenshots / "report-plot.png")
    image = imread(png)
    assert image.shape[:2] == (847, 1320)                 # 12 x 7.7 in at 110 dpi
    renderer = chart.figure.canvas.get_renderer()
    frame = gpu.axes.get_window_extent(renderer)
    x, y = gpu.axes.transData.transform((10.0, 11.5))     # the 3060's peak
    assert 0.6 < (y - frame.y0) / frame.height < 0.95     # in the upper part of the plot area
    assert _near_colour(image, x, y, ORANGE)
    x0, y0 = gpu.axes.transData.transform((0.0, 2.0))     # where the 3060's line starts
    assert _near_colour(image, x0, y0, ORANGE)


def test_a_card_barely_used_is_drawn_in_mib_against_its_data():
    from vramancer.telemetry.plot import render_trace

    snaps = [Snapshot(T0 + i, [DeviceSample("cuda:0", "H100", "nvml", (200 + i) * 2**20, 80 * GiB)])
             for i in range(20)]
    chart = render_trace(Trace(snaps, [], [], 1.0, path="small.json"))
    (panel,) = chart.panels
    assert panel.unit == "MiB" and panel.data_top == 219.0
    assert 219.0 < panel.axes.get_ylim()[1] < 260.0
    assert panel.totals_drawn == [] and panel.axes.get_ylabel() == "MiB"
    _check_labels(chart)
    tiny = [Snapshot(T0 + i, [DeviceSample("sim", "sim", "simulated", 1000 * (i + 1), 24 * GiB)]) for i in range(5)]
    (panel,) = render_trace(Trace(tiny, [], [], 1.0, path="tiny.json")).panels
    assert panel.unit == "KiB" and panel.data_top == pytest.approx(5000 / 1024)


def test_forty_phases_keep_their_labels_apart():
    from vramancer.telemetry.plot import render_trace

    snaps = [Snapshot(T0 + i * 0.05, [DeviceSample("cuda:0", "H100", "nvml", int((0.5 + (i % 17) / 50) * GiB),
                                                   80 * GiB)]) for i in range(200)]
    phases = [PhaseInterval(f"step{k}", T0 + k * 0.25, T0 + k * 0.25 + 0.2) for k in range(40)]
    chart = render_trace(Trace(snaps, phases, [], 0.05, path="many.json"))
    _check_labels(chart)
    assert len(chart.panels[0].phase_labels) >= 20        # staggered rows keep most of them
    legend = chart.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [f"step{k}" for k in range(40)]


def test_report_plot_command_writes_the_png(tmp_path, capsys):
    from matplotlib.image import imread

    from vramancer.cli import main

    trace = _hard_trace()
    path = write_json(tmp_path / "t.json", trace.snapshots, trace.phases, trace.marks, interval=0.1)
    assert main(["report", str(path), "--plot", str(tmp_path / "m.png")]) == 0
    assert "chart written to" in capsys.readouterr().out
    assert imread(tmp_path / "m.png").shape[:2] == (847, 1320)
