"""The Recorder: interval bounds, merging samplers, phases and marks, the ring buffer, the
background thread, subscriptions."""
from __future__ import annotations

import json
import math
import queue
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vramancer
from vramancer.errors import WorkloadError
from vramancer.telemetry.recorder import Recorder, track
from vramancer.telemetry.samplers import HostSampler, NvmlSampler
from vramancer.telemetry.samples import DeviceSample, ProcessSample

from .conftest import BrokenSampler, CounterSampler, ListSampler


@pytest.mark.parametrize("interval", [0.0, 0.049, 3600.5, -1, math.nan, math.inf, "1", True, None])
def test_interval_outside_bounds_is_refused(interval):
    with pytest.raises(WorkloadError, match="interval"):
        Recorder(samplers=[], interval=interval)


@pytest.mark.parametrize("interval", [0.05, 1, 3600])
def test_interval_bounds_are_inclusive(interval):
    assert Recorder(samplers=[], interval=interval).interval == float(interval)


@pytest.mark.parametrize("capacity", [0, -3, 1.5, True])
def test_capacity_must_be_a_positive_int(capacity):
    with pytest.raises(WorkloadError, match="capacity"):
        Recorder(samplers=[], capacity=capacity)


def test_one_tick_merges_every_sampler(backend3):
    rec = Recorder(samplers=[NvmlSampler(backend3), CounterSampler()], interval=1)
    snap = rec.sample_once()
    assert [d.device for d in snap.devices] == ["cuda:0", "cuda:1", "cuda:2", "sim:0"]
    assert len(snap.processes) == 2
    assert rec.latest() is snap
    assert rec.devices() == ["cuda:0", "cuda:1", "cuda:2", "sim:0"]


def test_a_failing_sampler_costs_only_its_own_samples():
    rec = Recorder(samplers=[BrokenSampler(), CounterSampler()], interval=1)
    snap = rec.sample_once()
    assert [d.used_bytes for d in snap.devices] == [1]
    assert snap.missing == ["broken: RuntimeError: sensor on fire"]
    assert rec.sampler_errors == 1


def test_nested_phases_innermost_wins_and_intervals_are_kept():
    rec = Recorder(samplers=[CounterSampler()], interval=1)
    rec.sample_once()
    with rec.phase("generate"):
        a = rec.sample_once()
        with rec.phase("prefill"):
            b = rec.sample_once()
            assert rec.current_phase() == "prefill"
        c = rec.sample_once()
        mark = rec.mark("first token")
    d = rec.sample_once()
    assert [s.phase for s in rec.snapshots()] == [None, "generate", "prefill", "generate", None]
    phases = rec.phases()
    assert [(p.name, p.depth) for p in phases] == [("generate", 0), ("prefill", 1)]
    gen, pre = phases
    assert gen.start <= a.timestamp <= pre.start <= b.timestamp <= pre.end <= c.timestamp <= gen.end <= d.timestamp
    assert rec.marks() == [mark] and gen.start <= mark.timestamp <= gen.end
    # the outer phase's peak includes the inner phase's samples
    report = rec.peaks()
    assert report.phase("generate").peak_used_bytes == 4 and report.phase("generate").samples == 3
    assert report.phase("prefill").peak_used_bytes == 3 and report.phase("prefill").samples == 1


def test_open_phase_has_no_end_and_bad_names_are_refused():
    rec = Recorder(samplers=[], interval=1)
    with rec.phase("load"):
        assert rec.phases()[0].end is None
    assert rec.phases()[0].end is not None
    with pytest.raises(WorkloadError):
        with rec.phase(""):
            pass
    with pytest.raises(WorkloadError):
        rec.mark("  ")


def test_phase_closes_when_the_block_raises():
    rec = Recorder(samplers=[CounterSampler()], interval=1)
    with pytest.raises(ZeroDivisionError):
        with rec.phase("load"):
            raise ZeroDivisionError("mid-phase")
    assert rec.current_phase() is None and rec.phases()[0].end is not None


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 20), n=st.integers(0, 60))
def test_ring_buffer_is_bounded_ordered_and_keeps_the_newest(capacity, n):
    rec = Recorder(samplers=[CounterSampler()], interval=1, capacity=capacity)
    for _ in range(n):
        rec.sample_once()
    snaps = rec.snapshots()
    assert len(snaps) == min(n, capacity)
    assert [s.devices[0].used_bytes for s in snaps] == list(range(max(1, n - capacity + 1), n + 1))
    assert all(a.timestamp <= b.timestamp for a, b in zip(snaps, snaps[1:], strict=False))
    assert rec.ticks == n
    # peaks cover every sample, including those the buffer dropped
    report = rec.peaks()
    assert report.samples == n
    if n:
        assert report.device("sim:0").peak_used_bytes == n


def test_peaks_keep_a_peak_the_ring_buffer_dropped():
    big = ([DeviceSample("g", "g", "simulated", used_bytes=900, total_bytes=1000)], [])
    small = ([DeviceSample("g", "g", "simulated", used_bytes=100, total_bytes=1000)], [])
    rec = Recorder(samplers=[ListSampler([big, small])], interval=1, capacity=2)
    with rec.phase("load"):
        first = rec.sample_once()
    for _ in range(4):
        rec.sample_once()
    assert all(s.devices[0].used_bytes == 100 for s in rec.snapshots())
    peak = rec.peaks().device("g")
    assert (peak.peak_used_bytes, peak.peak_timestamp, peak.peak_phase) == (900, first.timestamp, "load")
    assert peak.headroom_bytes == 100
    rec.reset_peaks()
    assert rec.peaks().samples == 0


def test_subscription_gets_new_snapshots_in_order_and_drops_the_oldest():
    rec = Recorder(samplers=[CounterSampler()], interval=1)
    rec.sample_once()                                   # before subscribing: not delivered
    sub = rec.subscribe(maxsize=2)
    with pytest.raises(queue.Empty):
        sub.get(timeout=0)
    for _ in range(5):
        rec.sample_once()
    assert [s.devices[0].used_bytes for s in sub.drain()] == [5, 6]
    assert sub.dropped == 3
    rec.sample_once()
    assert sub.get(timeout=1).devices[0].used_bytes == 7
    sub.close()
    rec.sample_once()
    assert sub.get(timeout=0) is None                   # closed
    assert list(sub) == []


def test_close_wakes_a_blocked_consumer():
    rec = Recorder(samplers=[CounterSampler()], interval=1)
    sub = rec.subscribe()
    got = []
    t = threading.Thread(target=lambda: got.append(sub.get(timeout=10)))
    t.start()
    rec.close()
    t.join(10)
    assert got == [None]


def test_background_thread_samples_and_stops_cleanly():
    rec = Recorder(samplers=[BrokenSampler(), CounterSampler()], interval=0.05)
    sub = rec.subscribe()
    rec.start()
    rec.start()                                          # idempotent
    seen = [sub.get(timeout=10) for _ in range(4)]       # the broken sampler does not stop it
    assert [s.devices[0].used_bytes for s in seen] == [1, 2, 3, 4]
    assert all(s.missing == ["broken: RuntimeError: sensor on fire"] for s in seen)
    assert rec.running
    rec.stop()
    assert not rec.running
    assert not any(t.name == "vramancer-recorder" and t.is_alive() for t in threading.enumerate())
    ticks = rec.ticks
    rec.start()
    assert sub.get(timeout=10).devices[0].used_bytes == ticks + 1
    rec.close()


def test_context_manager_starts_stops_and_takes_a_last_sample():
    counter = ListSampler([([DeviceSample("g", "g", "simulated", used_bytes=5)], [])])
    with Recorder(samplers=[counter], interval=3600) as rec:
        assert rec.running
        with rec.phase("work"):
            pass
    assert not rec.running
    # one sample when the thread started, one last sample on exit
    assert rec.ticks == 2 and counter.calls == 2
    assert counter.closed is False                       # samplers given by the caller stay open


def test_recorder_made_samplers_are_its_own(monkeypatch):
    made = []

    def fake_default(devices=None):
        s = ListSampler([([], [])])
        made.append(s)
        return [s]

    monkeypatch.setattr("vramancer.telemetry.samplers.default_samplers", fake_default)
    with Recorder(interval=3600):
        pass
    assert made and made[0].closed


def test_track_returns_a_started_recorder():
    rec = vramancer.track(interval=0.05, samplers=[CounterSampler()])
    try:
        assert rec.running and rec.interval == 0.05
        sub = rec.subscribe()
        assert sub.get(timeout=10) is not None
    finally:
        rec.close()
    rec2 = track(interval=1, samplers=[HostSampler()], capacity=5)
    with rec2:
        pass
    assert rec2.capacity == 5
    cpu = rec2.latest().devices[0]
    assert cpu.device == "cpu" and cpu.total_bytes > 0


def test_processes_and_sampler_phase_pass_through():
    proc = ProcessSample("g", 42, 7, "x")
    rec = Recorder(samplers=[ListSampler([([DeviceSample("g", "g", "replay", used_bytes=1)], [proc])])], interval=1)
    snap = rec.sample_once()
    assert snap.processes == [proc]
    assert rec.peaks().processes[0].peak_used_bytes == 7


def test_to_csv_and_to_json_without_a_path_return_the_text(tmp_path):
    from vramancer.telemetry.export import read_csv, read_json

    counter = ListSampler([([DeviceSample("g", "gpu, \"quoted\"", "simulated", used_bytes=5, total_bytes=80)],
                            [ProcessSample("g", 4242, 3, "py,thon")])])
    rec = Recorder(samplers=[counter], interval=1)
    with rec.phase("load"):
        rec.sample_once()
    rec.sample_once()
    csv_text, json_text = rec.to_csv(), rec.to_json()
    assert isinstance(csv_text, str) and isinstance(json_text, str)
    # the same bytes as the files
    assert rec.to_csv(tmp_path / "t.csv") == tmp_path / "t.csv"
    assert rec.to_json(tmp_path / "t.json") == tmp_path / "t.json"
    assert (tmp_path / "t.csv").read_bytes() == csv_text.encode()
    assert (tmp_path / "t.json").read_bytes() == json_text.encode()
    # and they read back as the trace that was recorded
    header, *rows = csv_text.splitlines()
    assert header.startswith("timestamp,device,name") and len(rows) == 4      # 2 snapshots x (device + process)
    for trace in (read_csv(tmp_path / "x.csv", text=csv_text), read_json(tmp_path / "x.json", text=json_text)):
        assert [s.devices[0].used_bytes for s in trace.snapshots] == [5, 5]
        assert trace.snapshots[0].devices[0].name == "gpu, \"quoted\""
        assert [(p.pid, p.name) for p in trace.snapshots[1].processes] == [(4242, "py,thon")]
        assert trace.snapshots[0].phase == "load" and trace.snapshots[1].phase is None
    assert json.loads(json_text)["phases"][0]["name"] == "load"
