"""Peak analysis: hypothesis against a brute-force reading of the same snapshots."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vramancer.telemetry.peaks import PeakTracker, PhaseInterval, analyse
from vramancer.telemetry.samples import DeviceSample, ProcessSample, Snapshot

DEVICES = {"cuda:0": ("nvml", 1000), "cuda:1": ("nvml", 500), "cpu": ("host", 10_000)}
PHASES = ["load", "prefill", "decode"]


@st.composite
def recordings(draw):
    """Snapshots at t = 0, 1, 2, ... with random used bytes (or absent), random innermost phases,
    and random phase intervals (possibly overlapping / open)."""
    n = draw(st.integers(1, 25))
    snaps = []
    for t in range(n):
        devices = []
        for dev in draw(st.lists(st.sampled_from(sorted(DEVICES)), unique=True, max_size=3)):
            source, total = DEVICES[dev]
            used = draw(st.one_of(st.none(), st.integers(0, total)))
            devices.append(DeviceSample(device=dev, name=dev, source=source, used_bytes=used, total_bytes=total,
                                        reserved_bytes=draw(st.one_of(st.none(), st.integers(0, 50)))))
        procs = [ProcessSample(device="cuda:0", pid=pid, used_bytes=draw(st.integers(0, 900)))
                 for pid in draw(st.lists(st.sampled_from([11, 22]), unique=True))]
        snaps.append(Snapshot(timestamp=float(t), devices=devices, processes=procs,
                              phase=draw(st.one_of(st.none(), st.sampled_from(PHASES)))))
    intervals = []
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, n))
        end = draw(st.one_of(st.none(), st.integers(start, n + 1)))
        intervals.append(PhaseInterval(name=draw(st.sampled_from(PHASES)), start=float(start),
                                       end=None if end is None else float(end)))
    return snaps, intervals


@settings(max_examples=80, deadline=None)
@given(recordings())
def test_device_peak_is_the_max_at_its_earliest_time_in_its_phase(rec):
    snaps, intervals = rec
    report = analyse(snaps, intervals)
    assert report.samples == len(snaps)
    for dev in {d.device for s in snaps for d in s.devices}:
        seen = [(s, d) for s in snaps for d in s.devices if d.device == dev]
        peak = report.device(dev)
        assert peak.samples == len(seen)
        used = [(d.used_bytes, s) for s, d in seen if d.used_bytes is not None]
        if not used:
            assert peak.peak_used_bytes is None and peak.headroom_bytes is None
            continue
        top = max(u for u, _ in used)
        first = next(s for u, s in used if u == top)
        assert peak.peak_used_bytes == top
        assert peak.peak_timestamp == first.timestamp
        assert peak.peak_phase == first.phase
        assert peak.headroom_bytes == DEVICES[dev][1] - top
        reserved = [d.reserved_bytes for _, d in seen if d.reserved_bytes is not None]
        assert peak.peak_reserved_bytes == (max(reserved) if reserved else None)


@settings(max_examples=80, deadline=None)
@given(recordings())
def test_phase_peak_is_the_max_over_accelerators_while_it_was_active(rec):
    snaps, intervals = rec
    report = analyse(snaps, intervals)

    def active(s, name):
        return s.phase == name or any(iv.name == name and iv.contains(s.timestamp) for iv in intervals)

    names = {s.phase for s in snaps if s.phase} | {iv.name for iv in intervals}
    assert {p.name for p in report.phases} == names
    for name in names:
        inside = [s for s in snaps if active(s, name)]
        accel = [(d.used_bytes, d.device, s.timestamp) for s in inside for d in s.devices
                 if d.used_bytes is not None and d.source != "host"]
        host = [(d.used_bytes, d.device, s.timestamp) for s in inside for d in s.devices
                if d.used_bytes is not None and d.source == "host"]
        pool = accel or host
        got = report.phase(name)
        assert got.samples == len(inside)
        if not pool:
            assert got.peak_used_bytes is None
            continue
        top = max(u for u, _, _ in pool)
        assert got.peak_used_bytes == top
        assert (top, got.device, got.peak_timestamp) in pool
        want_durations = [((iv.end if iv.end is not None else snaps[-1].timestamp) - iv.start)
                          for iv in intervals if iv.name == name]
        if want_durations:
            assert abs(got.duration_s - sum(max(0.0, d) for d in want_durations)) < 1e-9
        else:
            assert got.duration_s is None
    peaks = [p.peak_used_bytes if p.peak_used_bytes is not None else -1 for p in report.phases]
    assert peaks == sorted(peaks, reverse=True)


@settings(max_examples=60, deadline=None)
@given(recordings())
def test_process_peaks_and_incremental_tracker_agree_with_analyse(rec):
    snaps, intervals = rec
    report = analyse(snaps, intervals)
    for pid in {p.pid for s in snaps for p in s.processes}:
        rows = [(p.used_bytes, s) for s in snaps for p in s.processes if p.pid == pid]
        top = max(u for u, _ in rows)
        got = next(p for p in report.processes if p.pid == pid)
        assert got.peak_used_bytes == top
        first = next(s for u, s in rows if u == top)
        assert (got.peak_timestamp, got.peak_phase) == (first.timestamp, first.phase)
    # the tracker the Recorder feeds, given each sample's active phases, says the same
    tracker = PeakTracker()
    for s in snaps:
        tracker.add(s, {iv.name for iv in intervals if iv.contains(s.timestamp)})
    assert tracker.report(intervals) == report


def test_host_ram_counts_for_a_phase_only_without_an_accelerator():
    gpu = DeviceSample("cuda:0", "g", "nvml", used_bytes=3, total_bytes=10)
    ram = DeviceSample("cpu", "ram", "host", used_bytes=900, total_bytes=1000)
    snaps = [Snapshot(0.0, [gpu, ram], phase="a"), Snapshot(1.0, [ram], phase="b")]
    report = analyse(snaps)
    assert (report.phase("a").peak_used_bytes, report.phase("a").device) == (3, "cuda:0")
    assert (report.phase("b").peak_used_bytes, report.phase("b").device) == (900, "cpu")
    assert report.phase("a").per_device == {"cuda:0": 3, "cpu": 900}
    assert [p.name for p in report.phases] == ["b", "a"]


def test_lost_and_missing_are_reported():
    snaps = [
        Snapshot(0.0, [DeviceSample("cuda:1", "g", "nvml", used_bytes=4, total_bytes=8, missing=["power_w"])]),
        Snapshot(1.0, [DeviceSample("cuda:1", "g", "nvml", total_bytes=8, lost=True)]),
        Snapshot(2.0, [DeviceSample("cuda:1", "g", "nvml", total_bytes=8, lost=True)]),
    ]
    peak = analyse(snaps).device("cuda:1")
    assert peak.lost and peak.lost_timestamp == 1.0
    assert peak.missing == ("power_w",)
    assert (peak.peak_used_bytes, peak.headroom_bytes) == (4, 4)
    d = analyse(snaps).to_dict()
    assert d["devices"][0]["missing"] == ["power_w"] and d["samples"] == 3


def test_empty_recording():
    report = analyse([])
    assert report.samples == 0 and report.devices == [] and report.start is None
    assert report.to_dict()["phases"] == []
