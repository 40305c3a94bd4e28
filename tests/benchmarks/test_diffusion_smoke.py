"""Smoke test of benchmarks/diffusion.py at tiny sizes: both parts print, the split latents equal the
unsplit ones, every catalog card is judged under the three placements (a benchmark prints; it is not
asserted on speed)."""
from __future__ import annotations

import json

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("diffusion", "bench_diffusion")


def test_tiny_run(bench, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert bench.main(["--repeat", "1", "--steps", "2", "--size", "32", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "split vs unsplit" in out and "where they win:" in out
    assert out.count("GOAL") == 3
    d = json.loads(out_json.read_text())
    assert d["cpu"]["max_abs_diff"] <= 1e-5 and d["cpu"]["stages"] == 2
    assert d["cpu"]["split_s"] > 0 and d["cpu"]["unsplit_s"] > 0
    cases = {(r["case"], r["policy"]) for r in d["cards"]}
    assert len(cases) == 3 * 3
    ours = [r for r in d["cards"] if r["policy"] == "vramancer"]
    assert all(r["fits"] for r in ours)           # the plan fits every card of the issue
    for r in d["cards"]:
        if "peaks" in r:
            assert {k.split("@")[0] for k in r["peaks"]} == {"encode", "denoise", "decode"}
