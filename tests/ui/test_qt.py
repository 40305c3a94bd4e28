"""The Qt window rendered offscreen: charts per device with the recorded data, the process
table, the peaks, and a PNG grab a person can look at."""
from __future__ import annotations

import gc
import os
import time

import pytest

from .scripted import GiB


@pytest.fixture(scope="module")
def qapp():
    os.environ["QT_QPA_PLATFORM"] = "offscreen"      # before the QApplication exists
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    pytest.importorskip("pyqtgraph")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["vramancer-test"])
    from vramancer.ui.qt import emit_leaks_bools

    if emit_leaks_bools():   # PySide6 6.12.0 on Python < 3.12: the process would abort at exit
        pytest.skip("this PySide6 drops a reference to True on every Signal.emit; install PySide6-Essentials!=6.12.0")
    yield app
    # Tear the widgets down while Python is still whole: left to interpreter shutdown, PySide6
    # and pyqtgraph free objects in an order that can abort the process.
    for widget in app.topLevelWidgets():
        widget.close()
        widget.deleteLater()
    app.sendPostedEvents(None, 0)     # 0: QEvent.DeferredDelete included
    app.processEvents()
    gc.collect()


def _cells(table) -> list[list[str]]:
    return [[table.item(r, c).text() for c in range(table.columnCount())] for r in range(table.rowCount())]


def test_window_charts_tables_and_grab(qapp, recorder, sampler, screenshots):
    from vramancer.ui.qt import MonitorWindow

    with recorder.phase("load"):
        for i in range(1, 11):                       # before the window: loaded as history
            sampler.used["rtx3090#0"] = i * 2 * GiB
            sampler.used["rtx3060#0"] = i * GiB
            recorder.sample_once()
            time.sleep(0.02)                         # spread along the time axis for the picture
    window = MonitorWindow(recorder, interval_s=0.05, poll_ms=10_000)  # the test drives poll()
    window.show()
    qapp.processEvents()
    assert set(window.charts) == {"rtx3090#0", "rtx3060#0"}
    chart = window.charts["rtx3090#0"]
    xs, ys = chart.used_curve.getData()
    assert list(ys) == [2.0 * i for i in range(1, 11)]
    assert list(chart.total_curve.getData()[1]) == [24.0] * 10

    with recorder.phase("decode"):
        for used in (19, 15, 14):
            sampler.used["rtx3090#0"] = used * GiB
            recorder.sample_once()
            time.sleep(0.02)
    assert window.poll() == 3
    qapp.processEvents()
    xs, ys = chart.used_curve.getData()
    assert len(xs) == 13 and list(ys[-3:]) == [19.0, 15.0, 14.0]
    assert list(xs) == sorted(xs)
    assert chart.usage.text() == "14.00 / 24.00 GiB (58%)" and chart.bar.value() == 583
    assert "power: n/a (not supported)" in chart.details.text()
    assert _cells(window.processes) == [["4242", "python", "rtx3090#0", "5.00"]]
    peaks = {row[0]: row for row in _cells(window.peaks)}
    assert peaks["rtx3090#0"][1] == "20.00" and peaks["rtx3090#0"][3] == "load"
    assert peaks["rtx3090#0"][4] == "4.00" and peaks["rtx3060#0"][1] == "10.00"
    assert "decode 19.00 GiB on rtx3090#0" in window.top_phases.text()
    assert window.poll() == 0                          # nothing new: nothing redrawn

    # axes say what they count, in which unit; time starts at 0 on the first sample, on every chart
    for c in window.charts.values():
        assert c.plot.getAxis("left").labelText == "memory used" and c.plot.getAxis("left").labelUnits == "GiB"
        assert c.plot.getAxis("bottom").labelUnits == "s"
        assert c.plot.getAxis("bottom").labelText == "time since the first sample"
    assert xs[0] == 0.0 and window.charts["rtx3060#0"].used_curve.getData()[0][0] == 0.0
    # the table, the summary and the charts agree: each chart marks the table's peak at the table's time
    for device, row in peaks.items():
        mx, my = window.charts[device].peak_marker.getData()
        assert list(my) == [float(row[1])]
        assert row[2].startswith(f"+{mx[0]:.2f} s (")
        cx, cy = window.charts[device].used_curve.getData()
        assert max(cy) == float(row[1]) and cx[list(cy).index(max(cy))] == mx[0]
    top_phase_peak = window.top_phases.text().split("top phases: ")[1].split(" GiB")[0].split()[-1]
    assert top_phase_peak == max((row[1] for row in peaks.values()), key=float)

    image = window.grab()
    assert image.width() > 600 and image.height() > 400
    path = screenshots / "gui-qt.png"
    assert image.save(str(path), "PNG") and path.stat().st_size > 10_000
    # the peak marker is drawn where the chart puts it: its orange is in the chart's area of the grab
    plot = chart.plot
    corner = plot.mapTo(window, plot.rect().topLeft())
    pixels = image.toImage()
    orange = [(x, y) for x in range(corner.x(), corner.x() + plot.width(), 2)
              for y in range(corner.y(), corner.y() + plot.height(), 2)
              if pixels.pixelColor(x, y).red() > 230 and 150 < pixels.pixelColor(x, y).green() < 190
              and pixels.pixelColor(x, y).blue() < 90]
    assert orange, "the peak marker is not in the chart"
    top_y = min(y for _, y in orange)
    assert top_y < corner.y() + plot.height() / 2     # 20 of 24 GiB: the upper half of the chart
    window.close()
    assert window.poll() == 0                          # closed: unsubscribed


def test_lost_device_and_no_processes(qapp, recorder, sampler):
    from vramancer.ui.qt import MonitorWindow

    window = MonitorWindow(recorder, interval_s=0.05, poll_ms=10_000)
    sampler.lost.add("rtx3060#0")
    sampler.processes = []
    recorder.sample_once()
    window.poll()
    chart = window.charts["rtx3060#0"]
    assert chart.title().endswith("LOST") and chart.usage.text().startswith("used: n/a (device lost)")
    assert _cells(window.processes) == [["-", "no process reported", "", ""]]
    ys = chart.used_curve.getData()[1]
    assert len(ys) == 1 and ys[0] != ys[0]            # absent: NaN, drawn as a gap, never 0
    window.close()
