"""Peak memory of `vramancer report` on a large CSV trace: read whole (``read_trace`` + ``analyse``,
what `report` did before) against streamed row by row (``summarize_file``, what `report` does now).

    python benchmarks/report_memory.py [--mb 200] [--keep FILE]

Writes a CSV trace of about ``--mb`` megabytes (4 GPUs + host RAM + 2 processes per snapshot, the
columns `monitor --export` writes), then runs each reader in its own Python process and prints
that process's peak RSS (``ru_maxrss``), both peak reports' equality, and the ratio.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vramancer.telemetry.export import CSV_COLUMNS  # noqa: E402

_READERS = {
    "whole (before)": (
        "from vramancer.telemetry.export import read_trace; from vramancer.telemetry.peaks import analyse\n"
        "t = read_trace(PATH); r = analyse(t.snapshots, t.phases)\n"),
    "streamed (now)": (
        "from vramancer.telemetry.summary import summarize_file\n"
        "s, r = summarize_file(PATH)\n"),
}
_TAIL = ("import json, resource\n"
         "print(json.dumps({'rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
         " 'report': r.to_dict()}, sort_keys=True))\n")


def write_trace(path: Path, megabytes: int) -> int:
    """A CSV trace of about ``megabytes`` MB; returns the number of snapshots."""
    target = megabytes * 10**6
    gib = 2**30
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        t0 = 1_700_000_000.0
        while f.tell() < target:
            ts = repr(t0 + n * 0.1)
            phase = ("load", "prefill", "decode")[(n // 1000) % 3]
            for g in range(4):
                used = (g + 1) * gib + (n * 7919 + g * 104729) % gib
                w.writerow([ts, f"cuda:{g}", "NVIDIA GeForce RTX 3090", f"GPU-{g:08d}", used, 24 * gib,
                            300 * 2**20, "57.0", "231.5", "64.0", "", "", phase, "nvml", "0", "1695.0",
                            "9751.0", "", ""])
            w.writerow([ts, "cpu", "host RAM", "", 20 * gib + n % gib, 64 * gib, "", "", "", "", "", "",
                        phase, "host", "0", "", "", "", ""])
            for pid in (4242, 4343):
                w.writerow([ts, "cuda:0", "", "", gib + (n * pid) % gib, "", "", "", "", "", str(pid),
                            "python", phase, "", "0", "", "", "", ""])
            n += 1
    return n


def measure(code: str, path: Path) -> tuple[int, dict, float]:
    import json

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code.replace("PATH", repr(str(path))) + _TAIL],
                         capture_output=True, text=True, timeout=3600, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "reader failed")
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return doc["rss_kib"], doc["report"], time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the generated trace in MB (default 200)")
    ap.add_argument("--keep", default=None, help="write the trace here and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "trace.csv"
        snaps = write_trace(path, args.mb)
        size = path.stat().st_size
        print(f"trace: {size / 1e6:.0f} MB, {snaps:,} snapshots, {path}")
        results = {}
        for label, code in _READERS.items():
            rss, report, secs = measure(code, path)
            results[label] = (rss, report)
            print(f"{label:16s} peak RSS {rss / 1024:8.1f} MiB  ({secs:5.1f} s)")
        (rss_a, rep_a), (rss_b, rep_b) = results.values()
        print(f"same peak report: {rep_a == rep_b}")
        print(f"peak RSS ratio whole / streamed: {rss_a / rss_b:.1f}x")
        return 0 if rep_a == rep_b else 1


if __name__ == "__main__":
    sys.exit(main())
