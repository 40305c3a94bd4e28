"""Smoke test of benchmarks/quant_onload.py at tiny sizes: one row per on-load variant, measured
weight bytes equal to the plan's, NF4 and FP4 the same bytes, figures finite."""
from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("quant_onload", "bench_quant_onload")


def test_tiny_run(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "cache"))
    out_json = tmp_path / "onload.json"
    rc = bench.main(["--hidden", "128", "--layers", "2", "--vocab", "128", "--new", "3", "--threads", "1",
                     "--json", str(out_json)])
    assert rc == 0
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())["onload"]}
    assert list(rows)[:5] == ["float32", "bfloat16", "nf4", "int4 (fp4)", "int8"]
    for r in rows.values():
        assert r["stages_equal"] and r["weights_bytes"] == r["planned_weights_bytes"] > 0
        assert math.isfinite(r["mean_kl"]) and r["mean_kl"] >= -1e-6 and r["decode_tps"] > 0
    assert rows["float32"]["mean_kl"] == 0.0 and rows["bfloat16"]["memory_ratio"] == 0.5
    assert rows["nf4"]["weights_bytes"] == rows["int4 (fp4)"]["weights_bytes"] < rows["int8"]["weights_bytes"]
    assert "GOAL MET" in capsys.readouterr().out
