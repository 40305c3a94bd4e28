"""Smoke test of benchmarks/cluster.py at tiny sizes, one run: a 2-node Ray cluster is started and
shut down, both sides decode the same tokens, the table and JSON are written (no speed asserted)."""
from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("ray", reason="benchmarks/cluster.py needs Ray (pip install 'vramancer[cluster]')")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("cluster", "bench_cluster")


def test_tiny_run(bench, tmp_path, capsys, monkeypatch):
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "VRAMANCER_CONFIG"):
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    out_json = tmp_path / "cluster.json"
    rc = bench.main(["--layers", "2", "--hidden", "64", "--vocab", "128", "--prompt-tokens", "4",
                     "--new-tokens", "4", "--repeat", "1", "--json", str(out_json)])
    assert rc == 0
    r = json.loads(out_json.read_text())
    assert r["stages"] == ["node1/cpu blocks 0-1", "node2/cpu blocks 2-3"]
    assert r["two_nodes_tokens_per_s"] > 0 and r["one_process_tokens_per_s"] > 0
    assert math.isclose(r["ratio"], r["two_nodes_tokens_per_s"] / r["one_process_tokens_per_s"])
    assert math.isclose(r["link_and_wakeups_ms"] + sum(r["stage_compute_ms"]), r["step_ms"])
    text = capsys.readouterr().out.splitlines()
    assert text[1].split()[:2] == ["decode", "tokens/s"] and text[3].startswith("where a decode step goes")
    assert len(text) == 7


def test_bad_sizes_exit_2(bench, capsys):
    assert bench.main(["--layers", "0"]) == 2
    assert bench.main(["--new-tokens", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 2
