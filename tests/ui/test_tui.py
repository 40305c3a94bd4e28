"""The terminal monitor driven with textual's pilot: bars, updates, pause, export, screenshot."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable  # noqa: E402

from vramancer.ui.tui import DeviceCard, MonitorApp  # noqa: E402

GiB = 2**30


async def _until(pilot, condition, what: str, tries: int = 100) -> None:
    """Let the app run until ``condition()`` holds (bounded)."""
    for _ in range(tries):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"the monitor never showed {what}")


def _cards(app) -> dict[str, DeviceCard]:
    return {c.device: c for c in app.query(DeviceCard)}


def _text(label) -> str:
    return str(label.render())


def _cell_texts(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_bars_update_pause_and_export(recorder, sampler, tmp_path, screenshots):
    async def scenario() -> None:
        recorder.sample_once()                       # one sample before the app starts: shown at mount
        app = MonitorApp(recorder, interval_s=0.05, export_path=tmp_path / "trace.json")
        async with app.run_test(size=(120, 44)) as pilot:
            await _until(pilot, lambda: set(_cards(app)) == {"rtx3090#0", "rtx3060#0"}, "both devices")
            card = _cards(app)["rtx3090#0"]
            await _until(pilot, lambda: _text(card.usage_label) != "", "the bars")
            assert card.bar.percentage == pytest.approx(0.25)
            assert _text(card.usage_label) == "6.00 / 24.00 GiB (25%)"
            assert "power: n/a (not supported)" in _text(card.details_label)
            assert _cards(app)["rtx3060#0"].bar.percentage == pytest.approx(0.25)

            # New samples reach the bars, the sparkline history and the process table.
            sampler.used["rtx3090#0"] = 18 * GiB
            sampler.processes = [sampler.processes[0].__class__("rtx3090#0", 4242, 17 * GiB, "python")]
            recorder.sample_once()
            await _until(pilot, lambda: app.samples_seen == 2, "the second sample")
            await _until(pilot, lambda: card.bar.percentage == pytest.approx(0.75), "the new usage")
            assert _text(card.usage_label) == "18.00 / 24.00 GiB (75%)"
            assert card.sparkline.values == [6.0, 18.0] and card.sparkline.top == 24.0
            assert _cell_texts(app.query_one("#processes", DataTable)) == [["4242", "python", "rtx3090#0", "17.00"]]
            peaks = _cell_texts(app.query_one("#peaks", DataTable))
            assert [r[:2] for r in peaks] == [["rtx3090#0", "18.00"], ["rtx3060#0", "3.00"]]
            assert peaks[0][4] == "6.00"

            # p pauses the display; the recorder keeps recording, and resuming catches up.
            await pilot.press("p")
            assert app.paused
            sampler.used["rtx3090#0"] = 12 * GiB
            recorder.sample_once()
            await _until(pilot, lambda: app.samples_seen == 3, "the third sample taken while paused")
            assert card.bar.percentage == pytest.approx(0.75)
            await pilot.press("p")
            await _until(pilot, lambda: card.bar.percentage == pytest.approx(0.5), "the sample after resuming")
            assert card.sparkline.values == [6.0, 18.0, 12.0]

            # e writes the trace where --export said.
            await pilot.press("e")
            await _until(pilot, lambda: app.exported == [tmp_path / "trace.json"], "the export")
            await pilot.pause(0.1)
            app.save_screenshot("monitor-tui.svg", str(screenshots))
            await pilot.press("q")
        assert app.return_value == 0 or app.return_value is None

    asyncio.run(scenario())
    data = json.loads((tmp_path / "trace.json").read_text())
    text = json.dumps(data)
    assert str(18 * GiB) in text and str(12 * GiB) in text
    svg = (screenshots / "monitor-tui.svg").read_text()
    assert "rtx3090#0" in svg and "GiB" in svg


def test_export_without_path_writes_a_timestamped_pair(recorder, tmp_path):
    async def scenario() -> list:
        recorder.sample_once()
        app = MonitorApp(recorder, interval_s=0.05, export_dir=tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("e")
            await _until(pilot, lambda: len(app.exported) == 2, "the export")
            await pilot.press("q")
        return app.exported

    written = asyncio.run(scenario())
    assert sorted(p.suffix for p in written) == [".csv", ".json"]
    assert all(p.parent == tmp_path and p.name.startswith("vramancer-trace-") and p.stat().st_size > 0
               for p in written)


def test_lost_device_and_duration(recorder, sampler):
    async def scenario() -> MonitorApp:
        sampler.lost.add("rtx3060#0")
        recorder.sample_once()
        app = MonitorApp(recorder, interval_s=0.05, duration_s=0.3)
        async with app.run_test(size=(100, 30)) as pilot:
            await _until(pilot, lambda: "rtx3060#0" in _cards(app), "the lost device")
            card = _cards(app)["rtx3060#0"]
            await _until(pilot, lambda: card.has_class("lost"), "the lost mark")
            assert _text(card.usage_label) == "used: n/a (device lost)  (total 12.00 GiB)"
            await _until(pilot, lambda: not app.is_running, "the end of --duration", tries=300)
        return app

    app = asyncio.run(scenario())
    assert app.return_value == 0
