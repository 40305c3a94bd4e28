"""benchmarks/gpu_check.py without a GPU: its no-CUDA line and exit code, and the readers and table
it uses on a GPU, fed the output formats of the real tools (pytest's JUnit XML from a real run)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.benchmarks.conftest import import_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    yield from import_script("gpu_check", "gpu_check")


def test_without_cuda_one_line_and_exit_0(gc):
    if gc.cuda_available()[0]:
        pytest.skip("a CUDA GPU is here: gpu_check runs its parts instead")
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == gc.NO_CUDA_EXIT == 0
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU here (") and p.stderr == ""


def test_junit_of_a_real_pytest_run(gc, tmp_path):
    (tmp_path / "test_three.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert 1 == 2
        def test_skipped(): pytest.skip("no")
    """))
    xml = tmp_path / "out.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        str(tmp_path / "test_three.py")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 1
    rows = gc.figures_from_junit(xml.read_text())
    assert rows[0].ours == "1 passed, 1 failed, 1 skipped" and rows[0].passed is False
    assert [r.metric for r in rows[1:]] == ["  failed: test_three::test_bad"]


def test_junit_all_skipped_is_not_a_pass(gc):
    xml = '<testsuites><testsuite name="pytest" tests="2" failures="0" errors="0" skipped="2"/></testsuites>'
    (row,) = gc.figures_from_junit(xml)
    assert row.ours == "0 passed, 0 failed, 2 skipped" and row.passed is False


def test_runtime_figures(gc):
    speeds = {"decode_tokens_per_s": 100.0, "prefill_tokens_per_s": 1000.0}
    doc = {"speed": {"unsplit": speeds,
                     "ours 2 stages": {"decode_tokens_per_s": 99.0, "prefill_tokens_per_s": 990.0},
                     "accelerate 2 stages": {"decode_tokens_per_s": 90.0, "prefill_tokens_per_s": 1100.0}},
           "offload": {"ours stream": {"decode_tokens_per_s": 50.0, "prefill_tokens_per_s": 400.0},
                       "accelerate offload": {"decode_tokens_per_s": 20.0, "prefill_tokens_per_s": 250.0}}}
    rows = {r.metric: r for r in gc.figures_from_runtime(doc)}
    dec = rows["streamed offload decode tok/s vs accelerate CPU offload"]
    assert (dec.ours, dec.anchor, dec.ratio, dec.passed) == ("50.0", "20.0", 2.5, True)
    pre = rows["streamed offload prefill tok/s vs accelerate CPU offload"]
    assert pre.ratio == 1.6 and pre.passed is False
    assert rows["2-stage split decode tok/s vs accelerate hooks"].passed is True
    assert rows["2-stage split prefill tok/s vs accelerate hooks"].ratio == pytest.approx(0.9)
    assert rows["2-stage split decode tok/s vs unsplit"].passed is None
    no_cuda = gc.figures_from_runtime({"speed": {}})
    assert no_cuda[0].passed is False and "not measured" in no_cuda[0].ours


def test_serve_and_telemetry_figures(gc):
    serve = {"levels": {"1": {"anchor_tokens_per_s": 50.0, "batched_tokens_per_s": 49.0, "anchor_ttft_p50_s": 0.01,
                              "batched_ttft_p50_s": 0.01},
                        "16": {"anchor_tokens_per_s": 50.0, "batched_tokens_per_s": 400.0, "anchor_ttft_p50_s": 2.0,
                               "batched_ttft_p50_s": 0.1}}}
    top, ttft = gc.figures_from_serve(serve)
    assert top.metric.startswith("serve tok/s at 16 clients") and top.ratio == 8.0 and top.passed is True
    assert ttft.ratio == pytest.approx(0.05) and ttft.passed is None
    tel = {"queries": [{"tool": "ours", "nvml": "real", "cpu_us_per_query": 200.0},
                       {"tool": "gpustat", "nvml": "real", "cpu_us_per_query": 800.0},
                       {"tool": "nvitop", "nvml": "real", "error": "nvitop: not installed"},
                       {"tool": "ours", "nvml": "fake", "cpu_us_per_query": 1.0}],
           "sampling": [{"samplers": "here", "names": "nvml,host", "interval_s": 0.1, "cpu_pct": 0.8,
                         "goal_pct": 3.0, "met": True},
                        {"samplers": "here", "names": "nvml,host", "interval_s": 1.0, "cpu_pct": 0.1,
                         "goal_pct": 1.0, "met": True}]}
    rows = gc.figures_from_telemetry(tel)
    assert [(r.metric, r.ratio, r.passed) for r in rows] == [
        ("NVML query CPU us, ours vs gpustat", 0.25, True),
        ("NVML query CPU us, ours vs nvitop", None, None),
        ("background sampling CPU at 10 Hz (nvml,host)", None, True)]
    assert rows[1].anchor == "nvitop: not installed"
    assert gc.figures_from_telemetry({"queries": [], "sampling": []})[0].passed is False


def test_markdown_table(gc):
    F = gc.Figure
    text = gc.markdown_table([F("a | b", "1.0", "2.0", 0.5, ">= 1", False), F("info", "x")])
    assert text.splitlines() == ["| metric | ours | anchor | ratio | goal | pass |",
                                 "|---|---|---|---|---|---|",
                                 "| a \\| b | 1.0 | 2.0 | 0.50 | >= 1 | **NO** |",
                                 "| info | x | - | - | - | - |"]


def test_an_exhausted_budget_skips_parts_without_running_them(gc):
    results = gc.run_all(budget_s=0)
    assert [r.name for r in results] == ["tests", "nvml", "memory", "runtime", "serve", "telemetry"]
    assert all(r.error.startswith("skipped: ") and r.figures == [] for r in results)
