"""Smoke test of benchmarks/kv_cache.py at tiny sizes: one row per KV format, measured KV bytes
equal to the plan's, the float cache agreeing with itself, figures finite."""
from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("kv_cache", "bench_kv_cache")


def test_tiny_run(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "cache"))
    out_json = tmp_path / "kv.json"
    rc = bench.main(["--hidden", "128", "--layers", "2", "--vocab", "128", "--new", "3", "--threads", "1",
                     "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["kv"]
    assert [r["kv_dtype"] for r in rows] == ["float32", "bfloat16", "fp8", "q8_0"]
    # 2 layers x K+V x 1 kv head x 64 values: f32 4 B, bf16 2, fp8 1, q8_0 34/32
    assert [r["kv_bytes_per_token"] for r in rows] == [1024, 512, 256, 272]
    for r in rows:
        assert r["stages_equal"] and r["kv_bytes"] == r["planned_kv_bytes"] == r["kv_bytes_per_token"] * 10
        assert math.isfinite(r["mean_kl"]) and r["mean_kl"] >= -1e-6 and r["decode_tps"] > 0
    assert rows[0]["greedy_agree"] == 1.0 and rows[0]["mean_kl"] == 0.0
    assert "GOAL MET" in text
