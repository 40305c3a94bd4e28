"""The desktop window (PySide6 + pyqtgraph): a live memory chart per device, a process table
and the peaks, fed from the Recorder's subscription by a QTimer on the GUI thread.

Every chart counts time in seconds since the window's first sample (the same origin for all of
them) and memory in GiB, both said on the axes; the peaks table gives each peak's time on that
axis too, and each chart marks its device's peak, so the table, the summary and the charts
show the same numbers.

Imported only by ``vramancer gui`` and tests; it does not start or stop the recorder.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from typing import Any

import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: I001  (PySide6 first: pyqtgraph binds to it)

from ..telemetry.samples import DeviceSample, Snapshot
from ..units import GiB
from .source import poll_feed
from .view import PEAK_HEADERS, PROCESS_HEADERS, device_view, iso_time, peak_rows, peaks_summary, process_table_rows

__all__ = ["MonitorWindow", "DeviceChart", "run_gui", "has_display", "emit_leaks_bools", "HISTORY_POINTS"]

HISTORY_POINTS = 600


def has_display() -> bool:
    """Whether Qt can open a window here (it aborts the process when it cannot)."""
    if os.environ.get("QT_QPA_PLATFORM"):
        return True
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class _Probe(QtCore.QObject):
    ping = QtCore.Signal()


def emit_leaks_bools() -> bool:
    """Whether this PySide6 drops a reference to ``True`` on every ``Signal.emit`` (PySide6
    6.12.0 does). Where bools are not immortal (Python < 3.12) that frees ``True`` after a few
    thousand emits and aborts the process; pyqtgraph emits several signals per redraw."""
    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.ping.emit()
    return sys.getrefcount(True) < before


TIME_AXIS = "time since the first sample"
MEMORY_AXIS = "memory used"


class DeviceChart(QtWidgets.QGroupBox):
    """One device: usage text and bar, other fields, and memory used (GiB) over time (seconds
    since ``origin``, the window's first sample)."""

    def __init__(self, device: str, history_points: int = HISTORY_POINTS,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(device, parent)
        self.device = device
        self.xs: deque[float] = deque(maxlen=history_points)          # unix seconds
        self.used: deque[float] = deque(maxlen=history_points)        # GiB (nan: absent)
        self.total: deque[float] = deque(maxlen=history_points)       # GiB (nan: absent)
        layout = QtWidgets.QVBoxLayout(self)
        row = QtWidgets.QHBoxLayout()
        self.bar = QtWidgets.QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setMaximumHeight(12)
        self.usage = QtWidgets.QLabel("")
        row.addWidget(self.bar, 1)
        row.addWidget(self.usage)
        layout.addLayout(row)
        self.details = QtWidgets.QLabel("")
        self.details.setStyleSheet("color: gray")
        self.details.setWordWrap(True)
        layout.addWidget(self.details)
        self.origin: float | None = None                               # unix seconds at x = 0
        self.plot = pg.PlotWidget()
        self.plot.setMinimumHeight(180)
        self.plot.setSizePolicy(QtWidgets.QSizePolicy.Expanding, QtWidgets.QSizePolicy.Ignored)
        for side, text, unit in (("left", MEMORY_AXIS, "GiB"), ("bottom", TIME_AXIS, "s")):
            axis = self.plot.getAxis(side)
            axis.enableAutoSIPrefix(False)                             # never "kGiB" or "ms"
            axis.setLabel(text, units=unit)
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.addLegend(offset=(10, 5))
        self.plot.setMouseEnabled(x=False, y=False)
        self.total_curve = self.plot.plot([], [], name="total",
                                          pen=pg.mkPen((150, 150, 150), width=1, style=QtCore.Qt.DashLine))
        self.used_curve = self.plot.plot([], [], name="used", pen=pg.mkPen((94, 196, 255), width=2),
                                         fillLevel=0, brush=pg.mkBrush(94, 196, 255, 50))
        self.peak_marker = self.plot.plot([], [], name="peak", pen=None, symbol="t", symbolSize=11,
                                          symbolBrush=(255, 170, 60), symbolPen=(255, 170, 60))
        layout.addWidget(self.plot, 1)          # the chart takes the spare height

    def add(self, sample: DeviceSample, timestamp: float) -> None:
        nan = float("nan")
        self.xs.append(timestamp)
        self.used.append(sample.used_bytes / GiB if sample.used_bytes is not None else nan)
        self.total.append(sample.total_bytes / GiB if sample.total_bytes is not None else nan)

    def redraw(self) -> None:
        origin = self.origin if self.origin is not None else (self.xs[0] if self.xs else 0.0)
        xs = [x - origin for x in self.xs]
        self.used_curve.setData(xs, list(self.used), connect="finite")
        self.total_curve.setData(xs, list(self.total), connect="finite")
        top = max([v for v in list(self.used) + list(self.total) if v == v] or [1.0])
        self.plot.setYRange(0, top * 1.05, padding=0)
        if xs:
            self.plot.setXRange(xs[0], max(xs[-1], xs[0] + 1e-3), padding=0.02)

    def show_peak(self, timestamp: float | None, used_bytes: int | None) -> None:
        """Mark the peak the peaks table lists for this device (nothing when it has none)."""
        if timestamp is None or used_bytes is None or self.origin is None:
            self.peak_marker.setData([], [])
            return
        self.peak_marker.setData([timestamp - self.origin], [used_bytes / GiB])

    def show_sample(self, sample: DeviceSample) -> None:
        view = device_view(sample)
        self.setTitle(view.title)
        self.usage.setText(view.usage)
        self.bar.setValue(int(round((view.fraction or 0.0) * 1000)))
        self.details.setText("  ·  ".join(view.details))
        self.setStyleSheet("QGroupBox { color: #d33; font-weight: bold }" if view.lost else "")


def _table(headers: list[str]) -> QtWidgets.QTableWidget:
    t = QtWidgets.QTableWidget(0, len(headers))
    t.setHorizontalHeaderLabels(headers)
    t.verticalHeader().setVisible(False)
    t.setEditTriggers(QtWidgets.QAbstractItemView.NoEditTriggers)
    t.setSelectionMode(QtWidgets.QAbstractItemView.NoSelection)
    t.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.Stretch)
    return t


def _fill(table: QtWidgets.QTableWidget, rows: list[tuple], numeric: tuple[int, ...] = ()) -> None:
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            item = QtWidgets.QTableWidgetItem(str(cell))
            if c in numeric:
                item.setTextAlignment(QtCore.Qt.AlignRight | QtCore.Qt.AlignVCenter)
            table.setItem(r, c, item)


class MonitorWindow(QtWidgets.QMainWindow):
    """Live view of ``recorder``; polls its subscription every ``poll_ms`` on the GUI thread.
    The peaks come from the recorder's incremental tracker, cheap to ask on every redraw."""

    def __init__(self, recorder: Any, *, interval_s: float = 1.0, poll_ms: int | None = None,
                 history_points: int = HISTORY_POINTS) -> None:
        super().__init__()
        self.recorder = recorder
        self.history_points = history_points
        self.charts: dict[str, DeviceChart] = {}
        self.samples_seen = 0
        self.origin: float | None = None          # unix seconds of the first sample: x = 0 on every chart
        self.last_snapshot: Snapshot | None = None
        self.setWindowTitle("VRAMancer — live VRAM")
        self.resize(1100, 760)

        self.grid_host = QtWidgets.QWidget()
        self.grid = QtWidgets.QGridLayout(self.grid_host)
        self.waiting = QtWidgets.QLabel("waiting for the first sample…")
        self.grid.addWidget(self.waiting, 0, 0)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.grid_host)

        self.processes = _table(list(PROCESS_HEADERS))
        self.peaks = _table(list(PEAK_HEADERS))
        self.peaks.horizontalHeader().setSectionResizeMode(PEAK_HEADERS.index("at"),
                                                           QtWidgets.QHeaderView.ResizeToContents)
        self.top_phases = QtWidgets.QLabel("")
        proc_box = QtWidgets.QGroupBox("Processes")
        QtWidgets.QVBoxLayout(proc_box).addWidget(self.processes)
        peaks_box = QtWidgets.QGroupBox("Peaks")
        peaks_layout = QtWidgets.QVBoxLayout(peaks_box)
        peaks_layout.addWidget(self.peaks)
        peaks_layout.addWidget(self.top_phases)
        bottom = QtWidgets.QWidget()
        bottom_layout = QtWidgets.QHBoxLayout(bottom)
        bottom_layout.setContentsMargins(0, 0, 0, 0)
        bottom_layout.addWidget(proc_box)
        bottom_layout.addWidget(peaks_box)

        splitter = QtWidgets.QSplitter(QtCore.Qt.Vertical)
        splitter.addWidget(scroll)
        splitter.addWidget(bottom)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([540, 200])
        self.setCentralWidget(splitter)
        self.status = self.statusBar()

        self._subscription = recorder.subscribe()
        past = list(recorder.snapshots())[-history_points:]
        for snap in past:
            self._take(snap)
        if past:
            self._show(past[-1])
        self.timer = QtCore.QTimer(self)
        self.timer.timeout.connect(self.poll)
        self.timer.start(int(poll_ms if poll_ms is not None else max(50, min(250, interval_s * 500))))

    def chart(self, device: str) -> DeviceChart:
        chart = self.charts.get(device)
        if chart is None:
            if self.waiting is not None:
                self.grid.removeWidget(self.waiting)
                self.waiting.hide()
                self.waiting.deleteLater()
                self.waiting = None
            chart = DeviceChart(device, self.history_points)
            chart.origin = self.origin
            n = len(self.charts)
            self.grid.addWidget(chart, n // 2, n % 2)
            self.charts[device] = chart
        return chart

    def poll(self) -> int:
        """Take every queued snapshot, redraw; returns how many came in."""
        return poll_feed(self._subscription, self._take, self._show)

    def _take(self, snap: Snapshot) -> None:
        if self.origin is None:
            self.origin = snap.timestamp
        self.samples_seen += 1
        self.last_snapshot = snap
        for sample in snap.devices:
            self.chart(sample.device).add(sample, snap.timestamp)

    def _show(self, snap: Snapshot) -> None:
        for sample in snap.devices:
            self.chart(sample.device).show_sample(sample)
        for chart in self.charts.values():
            chart.redraw()
        _fill(self.processes, process_table_rows(snap), numeric=(3,))
        report = self.recorder.peaks().to_dict()
        rows = []
        for row, item in zip(peak_rows(report), report.get("devices", []), strict=True):
            when = item.get("peak_timestamp")
            if isinstance(when, (int, float)) and self.origin is not None:   # the charts' time axis too
                since = when - self.origin
                row = (row[0], row[1], f"+{since:.2f} s ({row[2][:8]})" if since < 10 else
                       f"+{since:.1f} s ({row[2][:8]})", *row[3:])
            rows.append(row)
            chart = self.charts.get(str(item.get("device")))
            if chart is not None:
                chart.show_peak(when, item.get("peak_used_bytes"))
        _fill(self.peaks, rows, numeric=(1, 2, 4))
        self.top_phases.setText(peaks_summary(report))
        msg = f"last sample {iso_time(snap.timestamp)[11:]}  ·  {self.samples_seen} samples"
        if snap.phase:
            msg += f"  ·  phase {snap.phase}"
        if snap.missing:
            msg += "  ·  missing: " + "; ".join(snap.missing)
        self.status.showMessage(msg)

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        self.timer.stop()
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        super().closeEvent(event)


def run_gui(recorder: Any, *, interval_s: float = 1.0, duration_s: float | None = None,
            screenshot: str | None = None) -> int:
    """Show the window until it is closed (or ``duration_s`` passes); ``screenshot``: a PNG
    of the window written just before it closes."""
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["vramancer"])
    window = MonitorWindow(recorder, interval_s=interval_s)
    window.show()

    def finish() -> None:
        window.poll()
        if screenshot:
            window.grab().save(str(screenshot), "PNG")
        window.close()
        app.quit()

    if duration_s is not None:
        QtCore.QTimer.singleShot(int(max(duration_s, 0) * 1000), finish)
    return int(app.exec() or 0)
