"""Smoke test of benchmarks/gguf_denoiser_plan.py: FLUX.1-dev-sized GGUF headers (sparse files) plan,
at exact bytes: resident = the file's tensor bytes with the F32 vectors at bfloat16's 2 bytes."""
from __future__ import annotations

import math

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("gguf_denoiser_plan", "bench_gguf_denoiser_plan")


def test_flux_dev_headers_plan_at_exact_bytes(bench, tmp_path, capsys):
    from gguf import GGUFReader

    from vramancer.models.pipeline import pipeline_profile

    shapes = bench.flux_dev_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == 11_901_408_320     # FLUX.1-dev's parameter count
    assert bench.main(["--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("fits: True") == 2
    vectors = sum(math.prod(s) for s in shapes.values() if len(s) == 1)
    for quant, qbytes in (("Q8_0", 34 / 32), ("Q4_K", 144 / 256)):
        path = tmp_path / f"flux1-dev-{quant}.gguf"
        tensors = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
        prof = pipeline_profile(path)
        assert prof.denoiser_component.weights_bytes == tensors - 2 * vectors
        assert prof.denoiser_component.stored == f"GGUF {quant}"
        quantized = [s for s in shapes.values() if len(s) == 2 and s[-1] % (32 if quant == "Q8_0" else 256) == 0]
        assert prof.dequant_bytes == max(math.prod(s) for s in quantized) * 4     # float16 + bfloat16
        assert tensors < sum(math.prod(s) for s in shapes.values()) * qbytes * 1.01 + 2 * vectors * 4
