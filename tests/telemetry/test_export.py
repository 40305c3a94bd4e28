"""CSV / JSON traces: exact round trips, atomic writes, and clear errors on bad files; the same
traces through `vramancer report` (in-process and once as a subprocess), with the PNG chart."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vramancer.cli import main as cli_main
from vramancer.devices.nvml import NvmlBackend
from vramancer.errors import TraceFileError
from vramancer.telemetry.export import CSV_COLUMNS, read_trace, write_csv, write_json
from vramancer.telemetry.peaks import Mark, PhaseInterval, analyse
from vramancer.telemetry.recorder import Recorder
from vramancer.telemetry.samplers import NvmlSampler
from vramancer.telemetry.samples import DeviceSample, ProcessSample, Snapshot

from . import fake_nvml as F
from .fake_nvml import GiB

ROOT = Path(__file__).resolve().parents[2]


def _snapshots() -> list[Snapshot]:
    full = DeviceSample(device="cuda:0", name="NVIDIA GeForce RTX 3090, \"OC\"", source="nvml", used_bytes=10 * GiB,
                        total_bytes=24 * GiB, reserved_bytes=300 * 2**20, uuid="GPU-1", utilization_pct=87.5,
                        power_w=310.25, temperature_c=71.0, sm_clock_mhz=1500.0, mem_clock_mhz=9501.0,
                        missing=[])
    sparse = DeviceSample(device="cuda:1", name="RTX 3060", source="nvml", used_bytes=5 * GiB, total_bytes=12 * GiB,
                          missing=["power_w", "reserved_bytes"])
    lost = DeviceSample(device="cuda:1", name="RTX 3060", source="nvml", total_bytes=12 * GiB, lost=True)
    torch_dev = DeviceSample(device="torch:cuda:0", name="torch allocator on X", source="torch", used_bytes=123,
                             reserved_bytes=456, peak_bytes=789, total_bytes=24 * GiB)
    return [
        Snapshot(timestamp=1700000000.125, devices=[full, sparse, torch_dev],
                 processes=[ProcessSample("cuda:0", 4242, 9 * GiB, "python"), ProcessSample("cuda:0", 99, None, None)],
                 phase="load"),
        Snapshot(timestamp=1700000000.225, devices=[full, lost], processes=[], phase=None),
        Snapshot(timestamp=1700000001.0, devices=[full], processes=[ProcessSample("cuda:0", 4242, 11 * GiB, "py,thon")],
                 phase="decode"),
    ]


PHASES = [PhaseInterval("load", 1700000000.0, 1700000000.2, 0), PhaseInterval("decode", 1700000000.9, None, 0)]
MARKS = [Mark("first token", 1700000000.95)]


def test_json_round_trip_is_exact(tmp_path):
    path = write_json(tmp_path / "t.json", _snapshots(), PHASES, MARKS, interval=0.1)
    trace = read_trace(path)
    assert trace.format == "json" and trace.interval == 0.1
    assert trace.snapshots == _snapshots()
    assert trace.phases == PHASES and trace.marks == MARKS
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1 and set(doc) == {"schema", "interval", "phases", "marks", "snapshots"}


def test_csv_round_trip_is_exact(tmp_path):
    path = write_csv(tmp_path / "t.csv", _snapshots())
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header) == CSV_COLUMNS
    trace = read_trace(path)
    assert trace.format == "csv"
    assert trace.snapshots == _snapshots()
    # CSV keeps the innermost phase per row: intervals are rebuilt from the rows
    assert [(p.name, p.start, p.end) for p in trace.phases] == [
        ("load", 1700000000.125, 1700000000.125), ("decode", 1700000001.0, 1700000001.0)]


def test_recorder_exports_read_back(tmp_path, backend3):
    rec = Recorder(samplers=[NvmlSampler(backend3)], interval=0.05)
    with rec.phase("load"):
        rec.sample_once()
    rec.sample_once()
    for suffix in ("csv", "json"):
        path = getattr(rec, f"to_{suffix}")(tmp_path / f"r.{suffix}")
        assert read_trace(path).snapshots == rec.snapshots()
    assert read_trace(tmp_path / "r.json").phases == rec.phases()


def test_write_is_atomic(tmp_path):
    path = write_json(tmp_path / "t.json", _snapshots())
    before = path.read_bytes()
    bad = Snapshot(timestamp=float("nan"))               # JSON refuses NaN half-way through
    with pytest.raises(ValueError):
        write_json(path, [*_snapshots(), bad])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]   # no temporary left behind
    with pytest.raises(TraceFileError, match="does not exist"):
        write_csv(tmp_path / "nope" / "t.csv", [])


def _csv_text(tmp_path) -> str:
    return write_csv(tmp_path / "good.csv", _snapshots()).read_text()


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t[: t.index("\n", t.index("\n") + 1) + 40], r"line 3: \d+ fields, expected 19 \(truncated\?\)"),
    (lambda t: t.replace("10737418240", "10GiB", 1), "line 2: not an integer: '10GiB'"),
    (lambda t: t.replace("1700000000.225", "soon", 1), r"line \d+: not a number: 'soon'"),
    (lambda t: t.replace(",4242,", ",42x,", 1), r"line \d+: not an integer: '42x'"),
    (lambda t: "timestamp,device\n1,cuda:0\n", "line 1: not a VRAMancer CSV trace: missing columns name, uuid"),
    (lambda t: "", "empty file"),
    (lambda t: t.replace(",0,", ",maybe,", 1), r"line \d+: not 0 or 1: 'maybe'"),
    (lambda t: t + '1.0,cuda:0,"unterminated\n', r"line \d+: \d+ fields, expected 19"),
])
def test_malformed_csv_says_file_and_line(tmp_path, mutate, message):
    path = tmp_path / "bad.csv"
    path.write_text(mutate(_csv_text(tmp_path)))
    with pytest.raises(TraceFileError, match=message) as info:
        read_trace(path)
    text = str(info.value)
    assert text.startswith(str(path) + ": ") and "\n" not in text


@pytest.mark.parametrize("content, message", [
    (None, r"truncated JSON \("),
    ("[1, 2]", "the top level is not an object"),
    ('{"schema": 2, "snapshots": []}', "unsupported trace schema 2"),
    ('{"schema": 1}', "no 'schema' / 'snapshots'"),
    ('{"schema": 1, "snapshots": [{"timestamp": "x"}]}', r"snapshots\[0\]\.timestamp: must be a number"),
    ('{"schema": 1, "snapshots": [{"timestamp": 1, "devices": [{"device": "a", "used_bytes": 1.5}]}]}',
     r"snapshots\[0\]\.devices\[0\]: 'used_bytes' must be int or null"),
    ('{"schema": 1, "snapshots": [{"timestamp": 1, "devices": [{"name": "a"}]}]}',
     r"snapshots\[0\]\.devices\[0\]: 'device' is required"),
    ('{"schema": 1, "snapshots": [{"timestamp": 1, "processes": [{"device": "a", "pid": true}]}]}',
     r"processes\[0\]: 'pid' must be int"),
    ('{"schema": 1, "snapshots": [], "phases": [{"name": "x", "start": null}]}',
     r"phases\[0\]\.start: must be a number"),
    ('{"schema": 1, "snapshots": [] ,, }', "malformed JSON"),
])
def test_malformed_json_says_file_and_what(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is None:
        full = write_json(tmp_path / "full.json", _snapshots(), PHASES).read_text()
        content = full[: len(full) // 2]
    path.write_text(content)
    with pytest.raises(TraceFileError, match=message) as info:
        read_trace(path)
    assert str(info.value).startswith(str(path) + ": ") and "\n" not in str(info.value)


def test_missing_binary_and_directory_files(tmp_path):
    with pytest.raises(TraceFileError, match="no such file"):
        read_trace(tmp_path / "none.csv")
    with pytest.raises(TraceFileError, match="not a file"):
        read_trace(tmp_path)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceFileError, match="not UTF-8"):
        read_trace(tmp_path / "bin.csv")


def test_format_sniffed_without_a_known_suffix(tmp_path):
    j = write_json(tmp_path / "a.json", _snapshots())
    c = write_csv(tmp_path / "a.csv", _snapshots())
    shutil.copy(j, tmp_path / "trace1")
    shutil.copy(c, tmp_path / "trace2")
    assert read_trace(tmp_path / "trace1").format == "json"
    assert read_trace(tmp_path / "trace2").format == "csv"


# -- through `vramancer report` ---------------------------------------------------------------
def _recorded_trace(tmp_path) -> tuple[Path, Path, Recorder]:
    """A run over the fake 3-GPU NVML, one GPU lost mid-run, with phases and a known peak."""
    fake = F.lost_mid_run(after=4, index=2)
    rec = Recorder(samplers=[NvmlSampler(NvmlBackend(module=fake))], interval=0.05)
    with rec.phase("load"):
        for used in (2, 6, 12):
            fake.gpus[0].used_bytes = used * GiB
            rec.sample_once()
    with rec.phase("generate"):
        with rec.phase("prefill"):
            fake.gpus[0].used_bytes = 20 * GiB
            rec.sample_once()
        with rec.phase("decode"):
            for used in (16, 17):
                fake.gpus[0].used_bytes = used * GiB
                rec.sample_once()
    return rec.to_csv(tmp_path / "run.csv"), rec.to_json(tmp_path / "run.json"), rec


def test_report_json_round_trip_in_process(tmp_path, capsys):
    csv_path, json_path, rec = _recorded_trace(tmp_path)
    for path in (csv_path, json_path):
        assert cli_main(["report", str(path), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        d0 = next(d for d in doc["devices"] if d["device"] == "cuda:0")
        assert d0["peak_used_bytes"] == 20 * GiB and d0["peak_phase"] == "prefill"
        assert d0["headroom_bytes"] == 4 * GiB and d0["total_bytes"] == 24 * GiB
        lost = next(d for d in doc["devices"] if d["device"] == "cuda:2")
        assert lost["lost"] is True
        top = doc["phases"][0]
        assert top["device"] == "cuda:0" and top["peak_used_bytes"] == 20 * GiB
        # CSV keeps only the innermost phase per row; JSON keeps every interval
        outer = {"generate"} if path == json_path else set()
        assert {p["name"] for p in doc["phases"]} == {"load", "prefill", "decode"} | outer
        procs = {(p["pid"], p["device"]): p["peak_used_bytes"] for p in doc["processes"]}
        assert procs[(os.getpid(), "cuda:0")] == 9 * GiB
        assert doc["samples"] == 6
    # JSON keeps the outer phase: "generate" spans prefill + decode and peaks at 20 GiB
    assert cli_main(["report", str(json_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    gen = next(p for p in doc["phases"] if p["name"] == "generate")
    assert gen["peak_used_bytes"] == 20 * GiB and gen["samples"] == 3
    want = rec.peaks().to_dict()
    assert doc["devices"] == want["devices"] and doc["phases"] == want["phases"]


def test_report_tables(tmp_path, capsys):
    csv_path, _, _ = _recorded_trace(tmp_path)
    assert cli_main(["report", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "Peak memory per device" in out and "20.0 GiB" in out and "prefill" in out
    assert "lost" in out and "Phases by peak" in out and "Peak memory per process" in out


def _synthetic_run(tmp_path) -> Path:
    """A minute of a split model: two GPUs fill during load, prefill spikes, decode grows the KV
    cache; GPU 1 is lost near the end; host RAM and this process's allocator alongside."""
    t0 = 1_700_000_000.0
    snaps = []
    for i in range(121):
        t = i * 0.5
        load = min(t / 15.0, 1.0)
        gpu0 = int((1 + 15 * load + (3 if 20 <= t < 24 else 0) + max(0.0, t - 24) * 0.05) * GiB)
        gpu1 = int((0.5 + 8 * load + (1.5 if 20 <= t < 24 else 0) + max(0.0, t - 24) * 0.03) * GiB)
        phase = "load" if t < 15 else "warmup" if t < 20 else "prefill" if t < 24 else "decode"
        devs = [DeviceSample("cuda:0", "NVIDIA GeForce RTX 3090", "nvml", used_bytes=gpu0, total_bytes=24 * GiB),
                DeviceSample("cuda:1", "NVIDIA GeForce RTX 3060", "nvml", used_bytes=None if t >= 55 else gpu1,
                             total_bytes=12 * GiB, lost=t >= 55),
                DeviceSample("torch:cuda:0", "torch allocator on RTX 3090", "torch", used_bytes=gpu0 - GiB // 2,
                             total_bytes=24 * GiB),
                DeviceSample("cpu", "Host RAM", "host", used_bytes=int((6 + 20 * (1 - load)) * GiB),
                             total_bytes=64 * GiB)]
        snaps.append(Snapshot(t0 + t, devs, [ProcessSample("cuda:0", 4242, gpu0 - GiB, "python")], phase=phase))
    phases = [PhaseInterval("load", t0, t0 + 15), PhaseInterval("generate", t0 + 20, t0 + 60),
              PhaseInterval("prefill", t0 + 20, t0 + 24, 1), PhaseInterval("decode", t0 + 24, t0 + 60, 1)]
    return write_json(tmp_path / "minute.json", snaps, phases, [Mark("first token", t0 + 24)], interval=0.5)


def test_report_plot_writes_a_png(tmp_path, capsys, screenshots):
    path = _synthetic_run(tmp_path)
    png = tmp_path / "report.png"
    assert cli_main(["report", str(path), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    shutil.copy(png, screenshots / "report.png")
    out = capsys.readouterr().out
    assert f"chart written to {png}" in out
    assert cli_main(["report", str(path), "--json"]) == 0
    d0 = json.loads(capsys.readouterr().out)["devices"][0]
    # cuda:0 reaches 1 + 15 + 3 GiB when prefill starts (t = 20 s) and holds it through prefill
    assert (d0["peak_used_bytes"], d0["peak_phase"], d0["peak_timestamp"]) == (19 * GiB, "prefill", 1_700_000_020.0)
    _, json_path, _ = _recorded_trace(tmp_path)
    assert cli_main(["report", str(json_path), "--json", "--plot", str(tmp_path / "small.png")]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(tmp_path / "small.png")
    assert (tmp_path / "small.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content", ["timestamp,device\n", '{"schema": 1, "snapshots": [{"timestamp": 1', "\x00\x01"])
def test_report_bad_file_exits_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert cli_main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vramancer: error: {path}: ") and err.count("\n") == 1


def test_report_missing_file_and_bad_plot_folder(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    _, json_path, _ = _recorded_trace(tmp_path)
    assert cli_main(["report", str(json_path), "--plot", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_as_a_subprocess(tmp_path):
    csv_path, _, _ = _recorded_trace(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "vramancer", "report", str(csv_path), "--json"], env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["devices"][0]["peak_used_bytes"] == 20 * GiB
    (tmp_path / "cut.csv").write_text(csv_path.read_text()[:-30])
    bad = subprocess.run([sys.executable, "-m", "vramancer", "report", str(tmp_path / "cut.csv")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "(truncated?)" in bad.stderr


def test_analyse_of_a_read_trace_equals_the_recorders_peaks(tmp_path):
    _, json_path, rec = _recorded_trace(tmp_path)
    trace = read_trace(json_path)
    assert analyse(trace.snapshots, trace.phases) == rec.peaks()
