"""Smoke test of benchmarks/moe.py at tiny sizes: both placements are planned on the same devices,
loaded and run; their greedy tokens equal the unsplit model's, measured bytes per device equal the
plan's, every figure is printed (a benchmark prints; it is not asserted on speed)."""
from __future__ import annotations

import json

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("moe", "bench_moe")


def test_tiny_run(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "cache"))
    out_json = tmp_path / "moe.json"
    rc = bench.main(["--layers", "3", "--hidden", "128", "--experts", "4", "--moe-inter", "64", "--vocab", "256",
                     "--prompt", "12", "--new", "3", "--repeat", "1", "--threads", "1", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    whole, experts = res["rows"]
    assert whole["plan"] == "whole" and whole["host_layers"] >= 1 and whole["host_experts_layers"] == 0
    assert experts["plan"] == "experts" and experts["host_experts_layers"] >= 1 and experts["host_layers"] == 0
    for r in (whole, experts):
        assert r["tokens_equal"]
        assert r["weights_bytes_by_device"] == r["planned_weights_bytes_by_device"]
        assert r["measured_host_s"] > 0 and r["wall_tps"] > 0 and r["predicted_decode_tps"] > 0
    # the same devices, the same bytes in all: only where they are differs
    assert sum(whole["weights_bytes_by_device"].values()) == sum(experts["weights_bytes_by_device"].values())
    assert res["chosen"] in ("whole", "experts")
    assert all(m in ("execute", "stream", "phase") for m in res["whole_chosen"]["modes"])
    assert res["whole_chosen"]["predicted_decode_tps"] > 0 and "the planner's own whole-layer plan here" in text
    assert f"goal >= {bench.GOAL}x (measured)" in text and "GOAL" in text
    assert "wall clock here" in text
