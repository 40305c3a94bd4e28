"""Smoke test of benchmarks/link.py at tiny sizes and few repetitions: every row is measured
(children started, joined, exit 0), the table and JSON are written (no speed is asserted)."""
from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("link", "bench_link")


def test_tiny_run(bench, tmp_path, capsys):
    out_json = tmp_path / "link.json"
    rc = bench.main(["--repeat", "1", "--iters-big", "2", "--iters-small", "5", "--big-bytes", "65536",
                     "--small-bytes", "1024", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["metric"].split()[0], r["anchor_name"]) for r in rows] == [
        ("TCP", "python socket"), ("TCP", "torch gloo"), ("round", "python socket"), ("round", "torch gloo"),
        ("TLS", "python ssl"), ("shm", "Link TCP")]
    for r in rows:
        assert r["ours"] > 0 and r["anchor"] > 0 and math.isclose(r["ratio"], r["ours"] / r["anchor"])
        assert r["passed"] == (r["ratio"] >= float(r["goal"].split()[1][:-1]) if r["goal"].startswith(">=")
                               else r["ratio"] <= float(r["goal"].split()[1][:-1]))
    assert text.splitlines()[0].split() == ["metric", "ours", "anchor", "ratio", "goal", "pass", "cpu_us/op"]
    assert all(r["ours_cpu_us"] > 0 and r["anchor_cpu_us"] >= 0 for r in rows)
    lines = text.splitlines()
    assert len(lines) == 3 + len(rows)                 # header, rule, the rows, then which path ran
    assert lines[-1] in ("Link steady state: C", "Link steady state: Python")


def test_bad_sizes_exit_2(bench, capsys):
    assert bench.main(["--big-bytes", "3"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
