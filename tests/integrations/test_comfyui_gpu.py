"""The Split node on a real CUDA GPU inside ComfyUI (``gpu``-marked: skipped without CUDA).

Blocks split 1:1 over ``cuda:0`` and the CPU: the run must finish (every boundary, skip connection
and time embedding on the right device), the report must show the CUDA allocator peak and the
weights each device holds, and the unsplit MODEL sharing the same weights must run right after the
split one and the split one again after it (ComfyUI reloads on each switch). The images are not
compared bit for bit: the CPU stage computes in another precision path than the GPU.
"""
from __future__ import annotations

import copy

import pytest

from .test_comfyui import _image, _workflow

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


def test_split_over_the_gpu_and_the_cpu(comfy_gpu_server):
    server = comfy_gpu_server
    wf = _workflow("gpu-split", split=True, seed=5)
    wf["10"]["inputs"].update(devices="cuda:0,cpu", split="1,1", reserve="0")
    wf["11"]["inputs"]["device"] = "cuda:0"
    wf["12"]["inputs"]["device"] = "cuda:0"
    entry = server.run(wf)
    plan = entry["outputs"]["10"]["text"][0]
    assert "runs on cuda:0" in plan and "runs on cpu" in plan, plan
    report = entry["outputs"]["13"]["text"][0]
    lines = report.splitlines()
    assert any(ln.split()[:2] == ["denoise", "cuda:0"] and "allocator peak" in ln for ln in lines), report
    assert len([ln for ln in lines if ln.startswith("denoise") and "weights held" in ln]) == 2, report
    split_img = _image(server, entry)
    plain = _image(server, server.run(_workflow("gpu-unsplit", split=False, seed=5)))
    wf2 = copy.deepcopy(wf)
    wf2["5"]["inputs"]["seed"] = 6           # a new sampling: the split MODEL loads again after the unsplit one
    wf2["7"]["inputs"]["filename_prefix"] = "gpu-split-again"
    again = server.run(wf2)
    for img in (split_img, plain, _image(server, again)):
        assert img.shape == (64, 64, 3) and img.std() > 1.0
    assert "weights held" in again["outputs"]["13"]["text"][0]
