"""The texts every live view shows: usage, absent fields said in words, tables, the log line."""
from __future__ import annotations

import time

from vramancer.telemetry.peaks import analyse
from vramancer.telemetry.samples import DeviceSample, ProcessSample, Snapshot
from vramancer.ui.view import (
    device_view,
    display_dict,
    history_blocks,
    iso_time,
    no_process_text,
    peak_rows,
    peaks_summary,
    process_rows,
    sample_line,
    top_phase_rows,
    top_process_text,
)

GiB = 2**30


def test_usage_and_fraction():
    v = device_view(DeviceSample("cuda:0", "NVIDIA A100", "nvml", used_bytes=6 * GiB, total_bytes=24 * GiB))
    assert v.usage == "6.00 / 24.00 GiB (25%)"
    assert v.fraction == 0.25
    assert v.title == "cuda:0  NVIDIA A100"          # real samplers need no source tag
    sim = device_view(DeviceSample("rtx3090#0", "RTX 3090", "simulated", used_bytes=0, total_bytes=24 * GiB))
    assert sim.title.endswith("[simulated]") and sim.usage == "0.00 / 24.00 GiB (0%)"
    sim_missing = DeviceSample("rtx3090#0", "RTX 3090", "simulated", used_bytes=0, total_bytes=GiB, missing=["power_w"])
    assert device_view(sim_missing).details == ("util, temp, sm clock, mem clock: n/a", "power: n/a (simulated)")


def test_absent_fields_are_said_not_hidden():
    s = DeviceSample("cuda:0", "GPU", "nvml", used_bytes=GiB, total_bytes=2 * GiB, utilization_pct=7.0,
                     power_w=None, temperature_c=None, missing=["power_w"])
    details = device_view(s).details
    assert "util 7%" in details
    assert "power: n/a (not supported)" in details
    assert "temp, sm clock, mem clock: n/a" in details    # absent but not declared unsupported
    assert details == ("util 7%", "power: n/a (not supported)", "temp, sm clock, mem clock: n/a")
    none_used = device_view(DeviceSample("cuda:1", "GPU", "nvml", used_bytes=None, total_bytes=8 * GiB,
                                         missing=["used_bytes"]))
    assert none_used.usage == "used: n/a (not supported)  (total 8.00 GiB)" and none_used.fraction is None
    lost = device_view(DeviceSample("cuda:2", "GPU", "nvml", lost=True))
    assert lost.lost and lost.title.endswith("LOST") and lost.usage == "used: n/a (device lost)"
    assert lost.details == ("util, power, temp, sm clock, mem clock: n/a (device lost)",)


def test_process_rows_largest_first_and_vanished():
    rows = process_rows([ProcessSample("cuda:0", 10, GiB, "a"), ProcessSample("cuda:0", 11, None, None),
                         ProcessSample("cuda:1", 12, 3 * GiB, "b")])
    assert rows == [("12", "b", "cuda:1", "3.00"), ("10", "a", "cuda:0", "1.00"),
                    ("11", "(gone)", "cuda:0", "n/a (not reported)")]
    snap = Snapshot(0.0, [DeviceSample("cuda:0", "GPU", "nvml", missing=["processes"])])
    assert no_process_text(snap) == "per-process memory: n/a (not supported)"
    assert no_process_text(Snapshot(0.0, [DeviceSample("cuda:0", "GPU", "nvml")])) == "no process reported"


def test_peak_rows_from_a_real_peak_report():
    t0 = 1_700_000_000.0
    snaps = [
        Snapshot(t0, [DeviceSample("cuda:0", "GPU", "nvml", used_bytes=2 * GiB, total_bytes=8 * GiB)],
                 [ProcessSample("cuda:0", 77, GiB, "python")], phase="load"),
        Snapshot(t0 + 1, [DeviceSample("cuda:0", "GPU", "nvml", used_bytes=5 * GiB, total_bytes=8 * GiB)],
                 [ProcessSample("cuda:0", 77, 4 * GiB, "python")], phase="prefill"),
        Snapshot(t0 + 2, [DeviceSample("cuda:0", "GPU", "nvml", used_bytes=3 * GiB, total_bytes=8 * GiB)],
                 phase="decode"),
    ]
    report = analyse(snaps).to_dict()
    assert peak_rows(report) == [("cuda:0", "5.00", iso_time(t0 + 1)[11:], "prefill", "3.00")]
    assert top_phase_rows(report) == [("prefill", "5.00 GiB on cuda:0"), ("decode", "3.00 GiB on cuda:0"),
                                      ("load", "2.00 GiB on cuda:0")]
    assert top_process_text(report) == "pid 77 python: 4.00 GiB on cuda:0 (prefill)"
    assert peaks_summary(report) == ("top phases: prefill 5.00 GiB on cuda:0, decode 3.00 GiB on cuda:0, "
                                     "load 2.00 GiB on cuda:0\n"
                                     "top process: pid 77 python: 4.00 GiB on cuda:0 (prefill)")
    shown = display_dict(snaps[1], report)
    assert shown["devices"]["cuda:0"]["usage"] == "5.00 / 8.00 GiB (62%)"
    assert shown["processes"] == [["77", "python", "cuda:0", "4.00"]]
    assert shown["peaks"][0][1] == "5.00"


def test_sample_line_format():
    ts = time.mktime((2025, 1, 31, 14, 3, 7, 0, 0, -1)) + 0.25
    snap = Snapshot(ts, [DeviceSample("rtx3090#0", "RTX 3090", "simulated", used_bytes=GiB + GiB // 4,
                                      total_bytes=24 * GiB),
                         DeviceSample("cuda:1", "GPU", "nvml", lost=True),
                         DeviceSample("cpu", "RAM", "host", used_bytes=None, total_bytes=64 * GiB)],
                    phase="load")
    assert sample_line(snap) == ("2025-01-31T14:03:07.250 rtx3090#0 1.25/24.00 GiB | cuda:1 LOST"
                                 " | cpu n/a/64.00 GiB phase=load")
    assert sample_line(Snapshot(ts)) == "2025-01-31T14:03:07.250 no devices"


def test_history_blocks_fixed_scale():
    # 0, half, full of a 16 GiB device over 2 rows; padded on the left to the width.
    assert history_blocks([0.0, 8.0, 16.0], top=16.0, width=5, height=2) == ["    █", "   ██"]
    assert history_blocks([4.0], top=16.0, width=1, height=1) == ["▂"]
    assert history_blocks([1.0, 2.0, 3.0], top=0.0, width=2, height=1) == ["  "]
