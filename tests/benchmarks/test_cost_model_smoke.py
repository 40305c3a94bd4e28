"""Smoke test of benchmarks/cost_model.py at tiny sizes: one model, one round, one thread; the host
figures are measured, the prediction is the planner's, the row and its JSON are complete (a benchmark
prints ratios; it is not asserted on speed)."""
from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.conftest import import_script

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("cost_model", "bench_cost_model")


def test_tiny_run(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    out_json = tmp_path / "cost.json"
    try:
        rc = bench.main(["--models", "tiny-2L-h128", "--repeat", "1", "--threads", "1", "--prompt", "16",
                         "--new", "4", "--json", str(out_json)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    assert "tiny-2L-h128" in text and "GOAL" in text and "ms per block" in text
    (row,) = json.loads(out_json.read_text())["rows"]
    for k in ("measured_decode_tps", "predicted_decode_tps", "measured_prefill_tps", "predicted_prefill_tps"):
        assert row[k] > 0 and math.isfinite(row[k])
    # one round: its ratio is the row's
    assert row["decode_ratio"] == pytest.approx(row["measured_decode_tps"] / row["predicted_decode_tps"])
    assert row["prefill_ratio"] == pytest.approx(row["measured_prefill_tps"] / row["predicted_prefill_tps"])
    host = row["host"]
    assert host["threads"] == 1 and host["source"] == "measured"
    assert host["block_overhead_s"] > 0 and host["bandwidth_bytes_per_s"] > 0 and host["gemm_flops_per_s"] > 0
    assert host["decode_parallel_op_s"] == host["parallel_op_s"] == 0.0     # one thread: no hand-off
    assert not (tmp_path / "cache" / "host-speed.json").exists()            # without --save nothing is kept
