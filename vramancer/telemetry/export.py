"""Traces on disk: CSV and JSON writers and one reader for both. Writes are atomic (a temporary
file in the same folder, then a rename), so a reader never sees half a file we wrote.

CSV: one header line, then per snapshot one row per device and one row per process.

    column           device row                          process row
    timestamp        seconds since the epoch (float)     same
    device           device id ("cuda:0", "cpu")         the device the process uses
    name             device name                         empty
    uuid             device UUID or empty                empty
    used_bytes       bytes in use (int) or empty         bytes the process holds, or empty
    total_bytes      device memory (int) or empty        empty
    reserved_bytes   driver / allocator reserved         empty
    utilization_pct  0..100 or empty                     empty
    power_w          watts or empty                      empty
    temperature_c    degrees Celsius or empty            empty
    pid              empty                               the process id
    process_name     empty                               name, empty when it vanished
    phase            innermost phase of the snapshot     same
    source           sampler: nvml, amdsmi, torch, ...   empty
    lost             1 when the device was lost, else 0  0
    sm_clock_mhz     SM clock or empty                   empty
    mem_clock_mhz    memory clock or empty               empty
    peak_bytes       the sampler's own peak or empty     empty
    missing          fields not reported, ";"-joined     empty

Empty means absent (the driver did not report it). Rows of one snapshot share its timestamp and
follow each other. CSV keeps only the innermost phase of each row; phase intervals, marks and
what a snapshot with no device could not sample are kept by JSON only.

JSON, schema 1:

    {"schema": 1, "interval": 1.0,
     "phases": [{"name": "prefill", "start": t0, "end": t1, "depth": 0}, ...],
     "marks": [{"name": "first token", "timestamp": t}, ...],
     "snapshots": [Snapshot.to_dict(), ...]}

``read_trace(path)`` reads either (by suffix, else by the first character) and raises
``TraceFileError`` with one line naming the file and what is wrong (the line for CSV).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInputError, TraceFileError
from .peaks import Mark, PhaseInterval
from .samples import DeviceSample, ProcessSample, Snapshot

__all__ = ["Trace", "CSV_COLUMNS", "REQUIRED_CSV_COLUMNS", "JSON_SCHEMA", "write_csv", "write_json", "csv_text",
           "json_text", "read_trace", "read_csv", "read_json", "trace_to_dict", "phases_from_rows",
           "iter_csv_snapshots", "trace_format", "MAX_JSON_TRACE_BYTES"]

JSON_SCHEMA = 1
REQUIRED_CSV_COLUMNS = ("timestamp", "device", "name", "uuid", "used_bytes", "total_bytes", "reserved_bytes",
                        "utilization_pct", "power_w", "temperature_c", "pid", "process_name", "phase", "source",
                        "lost")
CSV_COLUMNS = REQUIRED_CSV_COLUMNS + ("sm_clock_mhz", "mem_clock_mhz", "peak_bytes", "missing")
# a JSON trace is parsed whole; beyond this, record CSV (read row by row, in bounded memory)
MAX_JSON_TRACE_BYTES = 512 * 2**20


@dataclass
class Trace:
    snapshots: list[Snapshot]
    phases: list[PhaseInterval] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    interval: float | None = None
    path: str | None = None
    format: str | None = None          # "csv" | "json"


# -- writing ----------------------------------------------------------------------------------
def _atomic_write(path: str | Path, write: Callable[[io.TextIOBase], None]) -> Path:
    """Through vramancer._io (a device node or FIFO is written through, never replaced; no
    temporary file left behind on any error); a path that cannot be written is a TraceFileError."""
    from .._io import atomic_open, check_writable

    path = Path(path)
    try:
        check_writable(path, "trace")
    except BadInputError as e:
        raise TraceFileError(str(e)) from None
    with atomic_open(path, "w", flag="trace", newline="") as f:
        write(f)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_csv(path: str | Path, snapshots: Iterable[Snapshot]) -> Path:
    """Write ``snapshots`` as CSV (columns in the module docstring), atomically."""
    return _atomic_write(path, lambda f: _csv_to(f, snapshots))


def csv_text(snapshots: Iterable[Snapshot]) -> str:
    """The CSV ``write_csv`` writes, as text."""
    buf = io.StringIO(newline="")
    _csv_to(buf, snapshots)
    return buf.getvalue()


def _csv_to(f: io.TextIOBase, snapshots: Iterable[Snapshot]) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in snapshots:
        ts = repr(float(s.timestamp))
        for d in s.devices:
            w.writerow([ts, d.device, d.name, _cell(d.uuid), _cell(d.used_bytes), _cell(d.total_bytes),
                        _cell(d.reserved_bytes), _cell(d.utilization_pct), _cell(d.power_w),
                        _cell(d.temperature_c), "", "", _cell(s.phase), d.source, _cell(bool(d.lost)),
                        _cell(d.sm_clock_mhz), _cell(d.mem_clock_mhz), _cell(d.peak_bytes),
                        ";".join(d.missing)])
        for p in s.processes:
            w.writerow([ts, p.device, "", "", _cell(p.used_bytes), "", "", "", "", "", str(int(p.pid)),
                        _cell(p.name), _cell(s.phase), "", "0", "", "", "", ""])


def trace_to_dict(snapshots: Iterable[Snapshot], phases: Sequence[PhaseInterval] = (),
                  marks: Sequence[Mark] = (), interval: float | None = None) -> dict:
    return {
        "schema": JSON_SCHEMA,
        "interval": interval,
        "phases": [p.to_dict() for p in phases],
        "marks": [m.to_dict() for m in marks],
        "snapshots": [s.to_dict() for s in snapshots],
    }


def write_json(path: str | Path, snapshots: Iterable[Snapshot], phases: Sequence[PhaseInterval] = (),
               marks: Sequence[Mark] = (), interval: float | None = None) -> Path:
    """Write a schema-1 JSON trace, atomically."""
    text = json_text(snapshots, phases, marks, interval)
    return _atomic_write(path, lambda f: f.write(text))


def json_text(snapshots: Iterable[Snapshot], phases: Sequence[PhaseInterval] = (),
              marks: Sequence[Mark] = (), interval: float | None = None) -> str:
    """The schema-1 JSON trace ``write_json`` writes, as text (one line)."""
    return json.dumps(trace_to_dict(snapshots, phases, marks, interval), allow_nan=False,
                      separators=(",", ":")) + "\n"


# -- reading ----------------------------------------------------------------------------------
def read_trace(path: str | Path) -> Trace:
    """Read a CSV or JSON trace; TraceFileError (one line) when it is missing, truncated or malformed."""
    p = Path(path)
    if trace_format(p) == "json":
        return read_json(p)
    return read_csv(p)


def trace_format(path: str | Path) -> str:
    """"csv" or "json": by suffix, else by the first character that is not white space."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".json"):
        return suffix[1:]
    with _open_text(p) as f:
        try:
            start = f.read(4096).lstrip()[:1]
        except UnicodeDecodeError:
            start = ""
    return "json" if start == "{" else "csv"


def _fail(path: Path, where: str, what: str) -> TraceFileError:
    return TraceFileError(f"{path}: {where}{what}")


def _int(value: str) -> int | None:
    return None if value == "" else int(value)


def _float(value: str) -> float | None:
    if value == "":
        return None
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {value!r}")
    return x


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true"):
        return True
    if v in ("0", "false", ""):
        return False
    raise ValueError(f"not 0 or 1: {value!r}")


def read_csv(path: str | Path, text: str | None = None) -> Trace:
    path = Path(path)
    snapshots = list(iter_csv_snapshots(path, text))
    return Trace(snapshots=snapshots, phases=phases_from_rows(snapshots), path=str(path), format="csv")


def _open_text(p: Path) -> io.TextIOBase:
    if not p.exists():
        raise TraceFileError(f"{p}: no such file")
    if not p.is_file():
        raise TraceFileError(f"{p}: not a file")
    try:
        return open(p, encoding="utf-8-sig", newline="")  # noqa: SIM115 - the caller closes it (a BOM is skipped)
    except OSError as e:
        raise TraceFileError(f"{p}: cannot read: {e.strerror or e}") from None


def iter_csv_snapshots(path: str | Path, text: str | None = None) -> Iterator[Snapshot]:
    """The snapshots of a CSV trace one at a time, read row by row (the file is never held in
    memory whole): a snapshot is yielded when a row with another timestamp starts. Raises
    TraceFileError naming the file and line at the first bad row."""
    path = Path(path)
    f = io.StringIO(text, newline="") if text is not None else _open_text(path)
    try:
        yield from _csv_snapshots(path, f)
    except UnicodeDecodeError as e:
        raise _fail(path, "", f"not a text trace (byte {e.start} of a block is not UTF-8)") from None
    except OSError as e:
        raise _fail(path, "", f"cannot read: {e.strerror or e}") from None
    finally:
        f.close()


MAX_CSV_LINE_CHARS = 1 << 20


def _bounded_lines(path: Path, f: io.TextIOBase) -> Iterator[str]:
    """The lines of ``f``, each read with a length limit: a 'line' of gigabytes (a binary or
    hostile file) is refused after MAX_CSV_LINE_CHARS, never held in memory whole."""
    n = 0
    while True:
        line = f.readline(MAX_CSV_LINE_CHARS + 1)
        if not line:
            return
        n += 1
        if len(line) > MAX_CSV_LINE_CHARS:
            raise _fail(path, f"line {n}: ", f"longer than {MAX_CSV_LINE_CHARS} characters (not a CSV trace?)")
        yield line


def _csv_snapshots(path: Path, f: io.TextIOBase) -> Iterator[Snapshot]:
    reader = csv.reader(_bounded_lines(path, f))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise _fail(path, "line 1: ", f"malformed CSV header ({e})") from None
    if header is None or not any(h.strip() for h in header):
        raise _fail(path, "", "empty file (no CSV header)")
    header = [h.strip() for h in header]
    absent = [c for c in REQUIRED_CSV_COLUMNS if c not in header]
    if absent:
        raise _fail(path, "line 1: ", f"not a VRAMancer CSV trace: missing columns {', '.join(absent)}")
    col = {name: i for i, name in enumerate(header)}
    current: Snapshot | None = None
    current_ts = None
    line = 1
    try:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise _fail(path, f"line {line}: ", f"{len(row)} fields, expected {len(header)}"
                            + (" (truncated?)" if len(row) < len(header) else ""))

            def get(name: str, row: list[str] = row) -> str:
                i = col.get(name)
                return row[i] if i is not None else ""

            try:
                ts_text = get("timestamp")
                ts = _float(ts_text)
                if ts is None:
                    raise ValueError("empty timestamp")
                device = get("device")
                if not device:
                    raise ValueError("empty device")
                phase = get("phase") or None
                if current is None or ts_text != current_ts:
                    if current is not None:
                        yield current
                    current = Snapshot(timestamp=ts, phase=phase)
                    current_ts = ts_text
                pid = _count(get("pid"), "pid")
                if pid is not None:
                    current.processes.append(ProcessSample(device=device, pid=pid,
                                                           used_bytes=_count(get("used_bytes"), "used_bytes"),
                                                           name=get("process_name") or None))
                else:
                    missing = get("missing")
                    current.devices.append(DeviceSample(
                        device=device, name=get("name"), source=get("source"),
                        used_bytes=_count(get("used_bytes"), "used_bytes"),
                        total_bytes=_count(get("total_bytes"), "total_bytes"),
                        reserved_bytes=_count(get("reserved_bytes"), "reserved_bytes"),
                        uuid=get("uuid") or None, utilization_pct=_float(get("utilization_pct")),
                        power_w=_float(get("power_w")), temperature_c=_float(get("temperature_c")),
                        sm_clock_mhz=_float(get("sm_clock_mhz")), mem_clock_mhz=_float(get("mem_clock_mhz")),
                        lost=_bool(get("lost")), missing=[m for m in missing.split(";") if m],
                        peak_bytes=_count(get("peak_bytes"), "peak_bytes"),
                    ))
            except ValueError as e:
                raise _fail(path, f"line {line}: ", _value_error(e)) from None
    except csv.Error as e:
        raise _fail(path, f"line {reader.line_num}: ", f"malformed CSV ({e}; truncated?)") from None
    if current is not None:
        yield current


def _count(value: str, name: str) -> int | None:
    """A byte count or pid cell: empty (absent) or a non-negative integer."""
    n = _int(value)
    if n is not None and n < 0:
        raise ValueError(f"{name} must not be negative: {value!r}")
    return n


def _value_error(e: ValueError) -> str:
    msg = str(e)
    if msg.startswith("invalid literal for int()"):
        return "not an integer: " + msg.split(":", 1)[1].strip()
    if msg.startswith("could not convert string to float"):
        return "not a number: " + msg.split(":", 1)[1].strip()
    return msg


def phases_from_rows(snapshots: Sequence[Snapshot]) -> list[PhaseInterval]:
    """Phase intervals rebuilt from each snapshot's (innermost) phase: a run of consecutive
    snapshots with one phase is one interval from its first to its last sample."""
    out: list[PhaseInterval] = []
    name = start = end = None
    for s in sorted(snapshots, key=lambda s: s.timestamp):
        if s.phase != name:
            if name is not None:
                out.append(PhaseInterval(name=name, start=start, end=end))
            name, start = s.phase, s.timestamp
        end = s.timestamp
    if name is not None:
        out.append(PhaseInterval(name=name, start=start, end=end))
    return out


# JSON validation: field -> (accepted types, nullable)
_NUM = (int, float)
_DEVICE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "device": ((str,), False), "name": ((str,), True), "source": ((str,), True),
    "used_bytes": ((int,), True), "total_bytes": ((int,), True), "reserved_bytes": ((int,), True),
    "uuid": ((str,), True), "utilization_pct": (_NUM, True), "power_w": (_NUM, True),
    "temperature_c": (_NUM, True), "sm_clock_mhz": (_NUM, True), "mem_clock_mhz": (_NUM, True),
    "lost": ((bool,), True), "peak_bytes": ((int,), True),
}
_PROCESS_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "device": ((str,), False), "pid": ((int,), False), "used_bytes": ((int,), True), "name": ((str,), True),
}


def _check_fields(path: Path, where: str, d: Any, spec: dict) -> dict:
    if not isinstance(d, dict):
        raise _fail(path, f"{where}: ", "must be an object")
    out = {}
    for key, (types, nullable) in spec.items():
        if key not in d or d[key] is None:
            if not nullable:
                raise _fail(path, f"{where}: ", f"{key!r} is required")
            out[key] = None
            continue
        v = d[key]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if ok and isinstance(v, float) and not math.isfinite(v):
            ok = False
        if ok and isinstance(v, int) and (key.endswith("_bytes") or key == "pid") and v < 0:
            raise _fail(path, f"{where}: ", f"{key!r} must not be negative, got {v}")
        if not ok:
            kind = "/".join(t.__name__ for t in types)
            raise _fail(path, f"{where}: ", f"{key!r} must be {kind}{' or null' if nullable else ''}, got {v!r:.40}")
        out[key] = v
    return out


def _strings(path: Path, where: str, v: Any) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _fail(path, f"{where}: ", "'missing' must be a list of strings")
    return list(v)


def _number(path: Path, where: str, v: Any, nullable: bool = False) -> float | None:
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, _NUM) or not math.isfinite(v):
        raise _fail(path, f"{where}: ", f"must be a number, got {v!r:.40}")
    return float(v)


def read_json(path: str | Path, text: str | None = None) -> Trace:
    """A JSON trace, read whole (vramancer._json: at most MAX_JSON_TRACE_BYTES, nesting, UTF-8
    checked; CSV traces are the ones read row by row)."""
    from .._json import parse_json, read_json_file

    path = Path(path)
    if text is None:
        _open_text(path).close()   # no such file / not a file, in this module's words
        doc = read_json_file(path, error=TraceFileError, what="JSON trace", max_bytes=MAX_JSON_TRACE_BYTES,
                             prefix=f"{path}: ")
    else:
        doc = parse_json(text, error=TraceFileError, prefix=f"{path}: ")
    if not isinstance(doc, dict):
        raise _fail(path, "", "not a VRAMancer JSON trace (the top level is not an object)")
    if "schema" not in doc or "snapshots" not in doc:
        raise _fail(path, "", "not a VRAMancer JSON trace (no 'schema' / 'snapshots')")
    if doc["schema"] != JSON_SCHEMA:
        raise _fail(path, "", f"unsupported trace schema {doc['schema']!r} (this version reads {JSON_SCHEMA})")
    interval = _number(path, "interval", doc.get("interval"), nullable=True)
    raw_snaps = doc["snapshots"]
    if not isinstance(raw_snaps, list):
        raise _fail(path, "snapshots: ", "must be a list")
    snapshots = []
    for i, s in enumerate(raw_snaps):
        where = f"snapshots[{i}]"
        if not isinstance(s, dict):
            raise _fail(path, f"{where}: ", "must be an object")
        ts = _number(path, f"{where}.timestamp", s.get("timestamp"))
        phase = s.get("phase")
        if phase is not None and not isinstance(phase, str):
            raise _fail(path, f"{where}.phase: ", "must be a string or null")
        devs = s.get("devices", [])
        procs = s.get("processes", [])
        if not isinstance(devs, list) or not isinstance(procs, list):
            raise _fail(path, f"{where}: ", "'devices' and 'processes' must be lists")
        devices = []
        for j, d in enumerate(devs):
            f = _check_fields(path, f"{where}.devices[{j}]", d, _DEVICE_FIELDS)
            f["name"] = f["name"] or ""
            f["source"] = f["source"] or ""
            f["lost"] = bool(f["lost"])
            f["missing"] = _strings(path, f"{where}.devices[{j}]", d.get("missing"))
            devices.append(DeviceSample(**f))
        processes = [ProcessSample(**_check_fields(path, f"{where}.processes[{j}]", p, _PROCESS_FIELDS))
                     for j, p in enumerate(procs)]
        snapshots.append(Snapshot(timestamp=ts, devices=devices, processes=processes, phase=phase,
                                  missing=_strings(path, where, s.get("missing"))))
    phases = []
    for i, p in enumerate(doc.get("phases") or []):
        where = f"phases[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise _fail(path, f"{where}: ", "must be an object with a 'name'")
        depth = p.get("depth", 0)
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise _fail(path, f"{where}.depth: ", "must be an integer")
        phases.append(PhaseInterval(name=p["name"], start=_number(path, f"{where}.start", p.get("start")),
                                    end=_number(path, f"{where}.end", p.get("end"), nullable=True), depth=depth))
    marks = []
    for i, m in enumerate(doc.get("marks") or []):
        where = f"marks[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise _fail(path, f"{where}: ", "must be an object with a 'name'")
        marks.append(Mark(name=m["name"], timestamp=_number(path, f"{where}.timestamp", m.get("timestamp"))))
    return Trace(snapshots=snapshots, phases=phases, marks=marks, interval=interval, path=str(path), format="json")
