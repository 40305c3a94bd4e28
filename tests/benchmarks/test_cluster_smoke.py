"""Smoke test of benchmarks/cluster.py at tiny sizes, one run: a 2-node Ray cluster is started and
shut down, both sides decode the same tokens, the table and JSON are written (no speed asserted)."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from tests.benchmarks.conftest import BENCHMARKS, import_script

pytest.importorskip("torch")
pytest.importorskip("ray", reason="benchmarks/cluster.py needs Ray (pip install 'vramancer[cluster]')")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("cluster", "bench_cluster")


def test_tiny_run(tmp_path):
    """Run as a script (its own process: Ray's connection is per process), inside a network namespace
    the test creates (Ray needs a non-loopback address; tests/cluster/_netns.py), deleted after."""
    from tests.cluster._netns import netns, skip_reason

    why = skip_reason()
    if why:
        pytest.skip(why)
    out_json = tmp_path / "cluster.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with netns("bench") as ns:
        p = subprocess.run(ns.python(str(BENCHMARKS / "cluster.py"), "--layers", "2", "--hidden", "64",
                                     "--vocab", "128", "--prompt-tokens", "4", "--new-tokens", "4", "--repeat", "1",
                                     "--json", str(out_json)), env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    r = json.loads(out_json.read_text())
    assert r["stages"] == ["node1/cpu blocks 0-1", "node2/cpu blocks 2-3"]
    assert r["two_nodes_tokens_per_s"] > 0 and r["one_process_tokens_per_s"] > 0
    assert math.isclose(r["ratio"], r["two_nodes_tokens_per_s"] / r["one_process_tokens_per_s"])
    assert math.isclose(r["link_and_wakeups_ms"] + sum(r["stage_compute_ms"]), r["step_ms"])
    text = p.stdout.splitlines()
    assert text[1].split()[:2] == ["decode", "tokens/s"] and text[3].startswith("where a decode step goes")
    assert len(text) == 7


def test_bad_sizes_exit_2(bench, capsys):
    assert bench.main(["--layers", "0"]) == 2
    assert bench.main(["--new-tokens", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 2
