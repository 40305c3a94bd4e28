"""Smoke test of benchmarks/quantized.py at tiny sizes: every table is printed, every type is
dequantized bit for bit, measured bytes equal the plan's, quality figures are finite (a benchmark
prints; it is not asserted on speed)."""
from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("quantized", "bench_quantized")


def test_tiny_run(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "cache"))
    out_json = tmp_path / "q.json"
    rc = bench.main(["--rows", "16", "--cols", "256", "--hidden", "256", "--layers", "1", "--vocab", "256",
                     "--new", "3", "--repeat", "1", "--kl-types", "Q8_0,Q4_K,Q4_0", "--kl-seqs", "1",
                     "--kl-len", "6", "--threads", "1", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert [r["type"] for r in res["dequant"]] == bench.DEQUANT_TYPES
    assert all(r["exact"] for r in res["dequant"])
    assert "goal >= 5x" in text and "GOAL" in text
    rows = {r["variant"]: r for r in res["decode"]}
    assert list(rows) == ["float32", "bfloat16", "GGUF Q8_0", "GGUF Q4_K"]
    for r in rows.values():
        assert r["weights_bytes"] == r["planned_weights_bytes"] and r["decode_tps"] > 0
    # bfloat16 holds exactly half the float32 bytes; Q8_0 34 bytes per 32 matrix values (norms in F32)
    assert rows["bfloat16"]["weights_bytes"] * 2 == rows["float32"]["weights_bytes"]
    assert rows["GGUF Q4_K"]["weights_bytes"] < rows["GGUF Q8_0"]["weights_bytes"] < rows["bfloat16"]["weights_bytes"]
    assert "measured weight bytes equal the plan's for every variant: GOAL MET" in text
    kl = {r["type"]: r for r in res["kl"]}
    assert list(kl) == ["Q8_0", "Q4_K", "Q4_0"]
    assert all(math.isfinite(r["mean_kl"]) and r["mean_kl"] >= 0 for r in kl.values())
    assert kl["Q8_0"]["mean_kl"] < kl["Q4_0"]["mean_kl"]        # 8 bits are closer to float than 4
