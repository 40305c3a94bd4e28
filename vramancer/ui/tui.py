"""The terminal monitor (textual): per-device memory bars and history sparklines, a per-process
table, the peaks, and keys to export (e), pause (p) and quit (q).

It reads a running Recorder through a subscription and never talks to a sampler; it does not
start or stop the recorder (``vramancer monitor`` does). Imported only by that subcommand.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Static

from ..telemetry.samples import DeviceSample, Snapshot
from ..units import GiB
from .source import export_trace, poll_feed
from .view import (
    PEAK_HEADERS,
    PROCESS_HEADERS,
    device_view,
    history_blocks,
    iso_time,
    peak_rows,
    peaks_summary,
    process_table_rows,
)

__all__ = ["MonitorApp", "DeviceCard", "HistoryStrip", "HISTORY_POINTS"]

HISTORY_POINTS = 240        # samples kept per device for the sparkline


def _card_id(device: str) -> str:
    # Widget ids allow letters, digits, "-" and "_" only.
    return "dev-" + "".join(c if c.isalnum() else "_" for c in device)


class HistoryStrip(Widget):
    """Memory used over the last samples, one column per sample, on a fixed 0..total scale
    (textual's Sparkline scales to the data's own min..max, which makes 1 MiB of noise look
    like a full GPU)."""

    DEFAULT_CSS = "HistoryStrip { height: 2; color: $accent; }"

    def __init__(self, classes: str | None = None) -> None:
        super().__init__(classes=classes)
        self.values: list[float] = []
        self.top = 0.0

    def set_data(self, values: list[float], top: float) -> None:
        self.values, self.top = values, top
        self.refresh()

    def render(self) -> Text:
        rows = history_blocks(self.values, self.top, self.size.width, self.size.height or 2)
        return Text("\n".join(rows), no_wrap=True)


class DeviceCard(Vertical):
    """One device: title, a memory bar with used/total GiB, a history sparkline, other fields."""

    DEFAULT_CSS = """
    DeviceCard { height: auto; border: round $primary; padding: 0 1; margin-bottom: 0; }
    DeviceCard.lost { border: round $error; }
    DeviceCard .title { text-style: bold; }
    DeviceCard .memory-row { height: 1; }
    DeviceCard ProgressBar { width: auto; }
    DeviceCard ProgressBar Bar { width: 40; }
    DeviceCard .usage { padding-left: 2; }
    DeviceCard HistoryStrip { height: 2; }
    DeviceCard .details { color: $text-muted; width: 1fr; }
    """

    def __init__(self, device: str) -> None:
        super().__init__(id=_card_id(device))
        self.device = device
        self.history: deque[float] = deque(maxlen=HISTORY_POINTS)   # used GiB per sample
        self.last: DeviceSample | None = None
        self._ready = False          # children mounted: safe to update
        self.title_label = Label(device, classes="title")
        self.bar = ProgressBar(total=100, show_eta=False, show_percentage=False, classes="memory")
        self.usage_label = Label("", classes="usage")
        self.sparkline = HistoryStrip(classes="history")
        self.details_label = Label("", classes="details")

    def compose(self) -> ComposeResult:
        yield self.title_label
        with Horizontal(classes="memory-row"):
            yield self.bar
            yield self.usage_label
        yield self.sparkline
        yield self.details_label

    def on_mount(self) -> None:
        self._ready = True
        if self.last is not None:
            self.show(self.last)

    def add_history(self, sample: DeviceSample) -> None:
        if sample.used_bytes is not None:
            self.history.append(sample.used_bytes / GiB)

    def show(self, sample: DeviceSample) -> None:
        self.last = sample
        if not self._ready:
            return          # on_mount shows it
        view = device_view(sample)
        self.title_label.update(view.title)
        self.bar.update(total=100, progress=0 if view.fraction is None else round(view.fraction * 100, 1))
        self.usage_label.update(view.usage)
        top = sample.total_bytes / GiB if sample.total_bytes else max(self.history, default=0.0)
        self.sparkline.set_data(list(self.history), top)
        details = list(view.details)
        if self.history:
            details.insert(0, f"history {min(self.history):.2f}–{max(self.history):.2f} GiB")
        self.details_label.update("  ·  ".join(details))
        self.set_class(view.lost, "lost")


class MonitorApp(App[int]):
    """Live view of ``recorder``. ``export_path``: where ``e`` writes (by suffix: .csv or .json);
    None writes a timestamped CSV and JSON pair in ``export_dir``. ``duration_s``: quit after it."""

    TITLE = "VRAMancer monitor"
    CSS = """
    #devices { height: 1fr; min-height: 6; }
    #bottom { height: auto; max-height: 50%; }
    #processes-box, #peaks-box { width: 1fr; height: auto; border: round $secondary; padding: 0 1; }
    .box-title { text-style: bold; }
    DataTable { height: auto; max-height: 14; }
    #status { height: 1; padding: 0 1; background: $boost; text-wrap: nowrap; text-overflow: ellipsis; }
    """
    BINDINGS = [
        Binding("e", "export", "Export CSV/JSON"),
        Binding("p", "pause", "Pause/resume"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, recorder, *, interval_s: float = 1.0, export_path: str | Path | None = None,
                 export_dir: str | Path = ".", duration_s: float | None = None) -> None:
        super().__init__()
        self.recorder = recorder
        self.interval_s = float(interval_s)
        self.export_path = Path(export_path) if export_path else None
        self.export_dir = Path(export_dir)
        self.duration_s = duration_s
        self.paused = False
        self.samples_seen = 0
        self.exported: list[Path] = []
        self.last_snapshot: Snapshot | None = None
        self._subscription = None
        self._message = ""

    # -- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(Static("waiting for the first sample…", id="waiting"), id="devices")
        with Horizontal(id="bottom"):
            with Vertical(id="processes-box"):
                yield Label("Processes", classes="box-title")
                yield DataTable(id="processes", zebra_stripes=True, cursor_type="none")
            with Vertical(id="peaks-box"):
                yield Label("Peaks", classes="box-title")
                yield DataTable(id="peaks", zebra_stripes=True, cursor_type="none")
                yield Label("", id="top-phases")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"every {self.interval_s:g} s"
        self.query_one("#processes", DataTable).add_columns(*PROCESS_HEADERS)
        self.query_one("#peaks", DataTable).add_columns(*PEAK_HEADERS)
        self._subscription = self.recorder.subscribe()
        # What the recorder already holds fills the history, so a late start loses nothing.
        past = list(self.recorder.snapshots())[-HISTORY_POINTS:]
        for snap in past:
            self._take(snap)
        if past:
            self._show(past[-1], )
        self.set_interval(min(self.interval_s, 0.25), self.poll)
        if self.duration_s is not None:
            self.set_timer(max(self.duration_s, 0.0), self._finish)
        self._update_status()

    def on_unmount(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    # -- data -----------------------------------------------------------------------------
    def poll(self) -> int:
        """Take every snapshot the subscription queued; show the newest. Returns how many."""
        return poll_feed(self._subscription, self._take, self._show, self.paused)

    def _card(self, device: str) -> DeviceCard:
        try:
            return self.query_one(f"#{_card_id(device)}", DeviceCard)
        except Exception:
            for waiting in self.query("#waiting"):
                waiting.remove()
            card = DeviceCard(device)
            self.query_one("#devices", VerticalScroll).mount(card)
            return card

    def _take(self, snap: Snapshot) -> None:
        self.samples_seen += 1
        self.last_snapshot = snap
        for sample in snap.devices:
            self._card(sample.device).add_history(sample)

    def _show(self, snap: Snapshot) -> None:
        for sample in snap.devices:
            self._card(sample.device).show(sample)
        table = self.query_one("#processes", DataTable)
        table.clear()
        for row in process_table_rows(snap):
            table.add_row(*row)
        self._show_peaks()
        self._update_status()

    def _show_peaks(self) -> None:
        report = self.recorder.peaks().to_dict()
        table = self.query_one("#peaks", DataTable)
        table.clear()
        for row in peak_rows(report):
            table.add_row(*row)
        self.query_one("#top-phases", Label).update(peaks_summary(report))

    def _update_status(self) -> None:
        parts = []
        if self.paused:
            parts.append("PAUSED (still recording)")
        if self.last_snapshot is not None:
            parts.append(f"last sample {iso_time(self.last_snapshot.timestamp)[11:]}")
            if self.last_snapshot.phase:
                parts.append(f"phase {self.last_snapshot.phase}")
        parts.append(f"{self.samples_seen} samples")
        if self._message:
            parts.append(self._message)
        if self.last_snapshot is not None and self.last_snapshot.missing:
            parts.append("missing: " + "; ".join(self.last_snapshot.missing))
        self.query_one("#status", Static).update(Text("  ·  ".join(parts), no_wrap=True, overflow="ellipsis"))

    # -- actions --------------------------------------------------------------------------
    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused and self.last_snapshot is not None:
            self._show(self.last_snapshot, )
        self._update_status()

    def export(self) -> list[Path]:
        """Write the recorded trace; returns the files written."""
        written = export_trace(self.recorder, self.export_path, self.export_dir)
        self.exported.extend(written)
        return written

    def action_export(self) -> None:
        try:
            written = self.export()
        except Exception as e:  # a full disk or a read-only folder must not end the monitor
            self._message = f"export failed: {e}"
            self.notify(self._message, severity="error")
        else:
            self._message = "exported " + ", ".join(str(p) for p in written)
            self.notify(self._message)
        self._update_status()

    def _finish(self) -> None:
        self.poll()
        self.exit(0)
