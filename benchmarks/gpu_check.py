"""GPU truth in one command: on a machine with a CUDA GPU, run what only a GPU can check and print
one table of figures.

    python benchmarks/gpu_check.py [--budget 470] [--json FILE]

Parts, in this order, each in its own subprocess with its own timeout (all within ``--budget``
seconds, 470 by default: under 8 minutes with start-up; a part that would start with less than
its minimum left is skipped and says so):

  tests      ``pytest -m gpu``: the gpu-marked tests (real split vs CPU, streamed offload with
             pinned double buffers, NVML sees a known torch allocation, GGUF dequantisation ...)
  nvml       NVML's used-memory delta for a 1 GiB torch allocation vs torch's own reserved delta
  memory     a Llama planned onto cuda:0 and loaded by vramancer, then generating at the planned
             context: the CUDA caching allocator's peak vs the plan's weights + KV + activations
  runtime    benchmarks/runtime.py: streamed offload vs accelerate's CPU offload, split vs
             accelerate and vs unsplit (simulated GPUs backed by cuda:0)
  serve      benchmarks/serve.py on simulated GPUs backed by cuda:0: continuous batching vs one
             request at a time, at 16 clients
  telemetry  benchmarks/telemetry.py: CPU per NVML query, ours vs gpustat / nvitop on the real
             driver, and the background sampling cost at 10 Hz

The table has one row per figure: metric, ours, anchor (what it is measured against, in the same
run), ratio (ours / anchor), goal, pass. Exit code: 0 when every figure met its goal, 1 when a
goal was missed or a part failed (error, timeout, out of budget).

Without CUDA (no torch, or ``torch.cuda.is_available()`` is False) it prints one line saying so
and exits 0: there is nothing to check here, which is not a failure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

__all__ = ["Figure", "PartResult", "cuda_available", "figures_from_junit", "figures_from_runtime",
           "figures_from_serve", "figures_from_telemetry", "markdown_table", "main"]

MiB = 2**20
GiB = 2**30
DEFAULT_BUDGET_S = 470
NVML_TOLERANCE_BYTES = 64 * MiB
NO_CUDA_EXIT = 0


@dataclass
class Figure:
    """One row of the table. ``ratio`` is ours / anchor; ``passed`` None: informational."""

    metric: str
    ours: str
    anchor: str = "-"
    ratio: float | None = None
    goal: str = "-"
    passed: bool | None = None


@dataclass
class PartResult:
    name: str
    seconds: float
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None


def cuda_available() -> tuple[bool, str]:
    """(True, device name) or (False, why not), without failing when torch is absent."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def _ratio(ours: float | None, anchor: float | None) -> float | None:
    if ours is None or anchor is None or anchor == 0 or math.isnan(ours) or math.isnan(anchor):
        return None
    return ours / anchor


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f} MiB"


# -- reading each part's output --------------------------------------------------------------------
def figures_from_junit(xml_text: str) -> list[Figure]:
    """The gpu-marked tests' outcome from pytest's JUnit XML: one row, plus one per failing test."""
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failed = errors = skipped = 0
    failing: list[str] = []
    for s in suites:
        tests += int(s.get("tests", 0))
        failed += int(s.get("failures", 0))
        errors += int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    passed = tests - failed - errors - skipped
    rows = [Figure("gpu-marked tests", f"{passed} passed, {failed + errors} failed, {skipped} skipped",
                   goal="all pass, at least one ran", passed=failed + errors == 0 and passed > 0)]
    rows += [Figure(f"  failed: {name}", "failed", passed=False) for name in failing]
    return rows


def figures_from_runtime(doc: dict) -> list[Figure]:
    """benchmarks/runtime.py --json: streamed offload and split figures."""
    rows: list[Figure] = []
    off = doc.get("offload")
    if off:
        for what, goal in (("decode", 2.0), ("prefill", 2.0)):
            key = f"{what}_tokens_per_s"
            o, a = off["ours stream"][key], off["accelerate offload"][key]
            r = _ratio(o, a)
            rows.append(Figure(f"streamed offload {what} tok/s vs accelerate CPU offload", f"{o:.1f}", f"{a:.1f}", r,
                               f">= {goal:g}", r is not None and r >= goal))
    else:
        rows.append(Figure("streamed offload vs accelerate CPU offload", "not measured (no CUDA in the run)",
                           passed=False))
    speed = doc.get("speed", {})
    base = speed.get("unsplit")
    for n in (2, 4):
        ours, acc = speed.get(f"ours {n} stages"), speed.get(f"accelerate {n} stages")
        if not ours or not acc:
            continue
        for what in ("decode", "prefill"):
            key = f"{what}_tokens_per_s"
            r = _ratio(ours[key], acc[key])
            rows.append(Figure(f"{n}-stage split {what} tok/s vs accelerate hooks", f"{ours[key]:.1f}",
                               f"{acc[key]:.1f}", r, ">= 1.0", r is not None and r >= 1.0))
        if base:
            r = _ratio(ours["decode_tokens_per_s"], base["decode_tokens_per_s"])
            rows.append(Figure(f"{n}-stage split decode tok/s vs unsplit", f"{ours['decode_tokens_per_s']:.1f}",
                               f"{base['decode_tokens_per_s']:.1f}", r))
    return rows


def figures_from_serve(doc: dict) -> list[Figure]:
    """benchmarks/serve.py --json: batched vs one-at-a-time tokens/s at the most clients."""
    levels = doc.get("levels", {})
    if not levels:
        return [Figure("serve: batched vs one at a time", "no load level measured", passed=False)]
    top = max(levels, key=int)
    lv = levels[top]
    r = _ratio(lv["batched_tokens_per_s"], lv["anchor_tokens_per_s"])
    return [Figure(f"serve tok/s at {top} clients vs one request at a time", f"{lv['batched_tokens_per_s']:.1f}",
                   f"{lv['anchor_tokens_per_s']:.1f}", r, ">= 3", r is not None and r >= 3.0),
            Figure(f"serve TTFT p50 at {top} clients (s)", f"{lv['batched_ttft_p50_s']:.3f}",
                   f"{lv['anchor_ttft_p50_s']:.3f}", _ratio(lv["batched_ttft_p50_s"], lv["anchor_ttft_p50_s"]))]


def figures_from_telemetry(doc: dict) -> list[Figure]:
    """benchmarks/telemetry.py --json: real-driver CPU per query and sampling cost at 10 Hz."""
    rows: list[Figure] = []
    real = {q["tool"]: q for q in doc.get("queries", []) if q.get("nvml") == "real"}
    ours = real.get("ours")
    if ours is None or "error" in ours:
        rows.append(Figure("NVML query CPU on the real driver", "not measured"
                           + (f" ({ours['error']})" if ours else " (no NVIDIA driver)"), passed=False))
    else:
        for tool in ("gpustat", "nvitop"):
            other = real.get(tool)
            if other is None or "error" in other:
                rows.append(Figure(f"NVML query CPU us, ours vs {tool}", f"{ours['cpu_us_per_query']:.0f}",
                                   (other or {}).get("error", "not run")))
                continue
            r = _ratio(ours["cpu_us_per_query"], other["cpu_us_per_query"])
            rows.append(Figure(f"NVML query CPU us, ours vs {tool}", f"{ours['cpu_us_per_query']:.0f}",
                               f"{other['cpu_us_per_query']:.0f}", r, "<= 1.0", r is not None and r <= 1.0))
    for s in doc.get("sampling", []):
        if s.get("samplers") == "here" and s.get("interval_s") == 0.1:
            rows.append(Figure(f"background sampling CPU at 10 Hz ({s.get('names', '')})", f"{s['cpu_pct']:.2f}%",
                               goal=f"< {s['goal_pct']:g}%", passed=bool(s["met"])))
    return rows


# -- parts measured here (each runs in its own subprocess: a crash or a hang costs only its row) ----
def _torch_index_in_nvml() -> int:
    """The NVML index of torch's cuda:0 (by UUID; the only GPU when there is one)."""
    import torch

    from vramancer.devices.nvml import NvmlBackend, gpus

    backend = NvmlBackend()
    if not backend.available():
        raise RuntimeError(f"NVML unavailable: {backend.unavailable_reason}")
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")).removeprefix("GPU-")
    inventory = gpus(backend)
    matches = [g for g in inventory if g.uuid.removeprefix("GPU-") == uuid]
    if not matches and len(inventory) == 1:
        matches = inventory
    if not matches:
        raise RuntimeError(f"cannot tell which NVML GPU is torch's cuda:0 (uuid {uuid!r})")
    return matches[0].index


def part_nvml() -> list[Figure]:
    import torch

    from vramancer.devices.nvml import NvmlBackend
    from vramancer.telemetry.samplers import NvmlSampler

    torch.zeros(1, device="cuda:0")                         # the CUDA context exists before the baseline
    torch.cuda.synchronize()
    sampler = NvmlSampler(NvmlBackend(), indices=[_torch_index_in_nvml()])
    before_nvml = sampler.sample().devices[0].used_bytes
    before_torch = torch.cuda.memory_reserved(0)
    x = torch.ones(GiB, dtype=torch.uint8, device="cuda:0")  # 1 GiB, touched
    torch.cuda.synchronize()
    nvml_delta = sampler.sample().devices[0].used_bytes - before_nvml
    torch_delta = torch.cuda.memory_reserved(0) - before_torch
    del x
    ok = abs(nvml_delta - torch_delta) <= NVML_TOLERANCE_BYTES
    return [Figure("NVML used delta for a 1 GiB torch allocation", _mib(nvml_delta), _mib(torch_delta),
                   _ratio(nvml_delta, torch_delta), f"within {NVML_TOLERANCE_BYTES // MiB} MiB of torch", ok)]


def part_memory() -> list[Figure]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import vramancer

    context, prompt = 512, 384
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(Path(tmp) / "llama")
        torch.cuda.reset_peak_memory_stats(0)
        base = torch.cuda.memory_allocated(0)
        model = vramancer.load(str(Path(tmp) / "llama"), devices="cuda:0", context=context)
        plan = model.vramancer.plan
        ids = torch.randint(3, 8000, (1, prompt), device=model.device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=context - prompt,
                           min_new_tokens=context - prompt, do_sample=False)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(0) - base
        planned = sum(s.weights_bytes + s.kv_cache_bytes + s.activation_bytes for s in plan.stages
                      if s.device == plan.stages[0].device)
        report = model.vramancer.memory_report()
        weights = report.weights_bytes
        planned_weights = sum(s.planned_weights_bytes for s in report.stages)
    r = _ratio(peak, planned)
    return [Figure(f"allocator peak vs plan on cuda:0 (generating to context {context})", _mib(peak), _mib(planned),
                   r, "<= 1.0", r is not None and r <= 1.0),
            Figure("weights on the GPU vs plan", _mib(weights), _mib(planned_weights), _ratio(weights, planned_weights),
                   "== 1.0", weights == planned_weights)]


IN_PROCESS_PARTS: dict[str, Callable[[], list[Figure]]] = {"nvml": part_nvml, "memory": part_memory}


# -- running -----------------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    timeout_s: float
    min_s: float
    run: Callable[[float, Path], PartResult]


def _subprocess(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run one part in its own process group: on timeout the whole group goes (a benchmark's own
    server or loader subprocesses must not hold the GPU while the next part measures it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return 124, f"timed out after {timeout_s:.0f} s"
    return p.returncode, out[-4000:]


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else "no output"


def _run_json(name: str, argv: list[str], timeout_s: float, out: Path,
              parse: Callable[[Any], list[Figure]], read: Callable[[str], Any] = json.loads) -> PartResult:
    t0 = time.monotonic()
    rc, text = _subprocess(argv, timeout_s)
    seconds = time.monotonic() - t0
    if not out.is_file():
        return PartResult(name, seconds, error=f"exit {rc}: {_last_line(text)}")
    try:
        figures = parse(read(out.read_text()))
    except Exception as e:  # noqa: BLE001 - a part's bad output is its row's error, not a crash
        return PartResult(name, seconds, error=f"unreadable output: {type(e).__name__}: {e}")
    return PartResult(name, seconds, figures, error=None if rc in (0, 1) else f"exit {rc}: {_last_line(text)}")


def _parts() -> list[Part]:
    py = sys.executable
    bench = ROOT / "benchmarks"

    def tests(t: float, tmp: Path) -> PartResult:
        out = tmp / "gpu-tests.xml"
        # pytest exits 1 when a test fails: the XML still says which
        return _run_json("tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                                   f"--junitxml={out}", "-o", "junit_family=xunit2", str(ROOT / "tests")],
                         t, out, figures_from_junit, read=lambda s: s)

    def here(part: str) -> Callable[[float, Path], PartResult]:
        def run(t: float, tmp: Path) -> PartResult:
            out = tmp / f"{part}.json"
            return _run_json(part, [py, __file__, "--part", part, "--out", str(out)], t, out,
                             lambda d: [Figure(**f) for f in d])
        return run

    def runtime(t: float, tmp: Path) -> PartResult:
        out = tmp / "runtime.json"
        return _run_json("runtime", [py, str(bench / "runtime.py"), "--repeat", "2", "--new", "16", "--prompt", "64",
                                     "--json", str(out)], t, out, figures_from_runtime)

    def serve(t: float, tmp: Path) -> PartResult:
        out = tmp / "serve.json"
        return _run_json("serve", [py, str(bench / "serve.py"), "--devices", "rtx3060,rtx3060", "--backing", "cuda:0",
                                   "--clients", "1,16", "--requests", "16", "--max-tokens", "32", "--no-others",
                                   "--json", str(out)], t, out, figures_from_serve)

    def telemetry(t: float, tmp: Path) -> PartResult:
        out = tmp / "telemetry.json"
        return _run_json("telemetry", [py, str(bench / "telemetry.py"), "--duration", "2", "--queries", "100",
                                       "--gpustat-queries", "10", "--json", str(out)], t, out, figures_from_telemetry)

    # timeouts add up to the default budget; a part that finishes early leaves its time to the later ones
    return [Part("tests", 120, 30, tests), Part("nvml", 30, 15, here("nvml")), Part("memory", 60, 20, here("memory")),
            Part("runtime", 130, 40, runtime), Part("serve", 70, 30, serve), Part("telemetry", 60, 25, telemetry)]


def markdown_table(figures: list[Figure]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| metric | ours | anchor | ratio | goal | pass |", "|---|---|---|---|---|---|"]
    for f in figures:
        verdict = "-" if f.passed is None else ("yes" if f.passed else "**NO**")
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}"
        lines.append(f"| {cell(f.metric)} | {cell(f.ours)} | {cell(f.anchor)} | {ratio} | {cell(f.goal)} | {verdict} |")
    return "\n".join(lines)


def run_all(budget_s: float, only: list[str] | None = None) -> list[PartResult]:
    results: list[PartResult] = []
    deadline = time.monotonic() + budget_s
    with tempfile.TemporaryDirectory(prefix="vramancer-gpu-check-") as tmp:
        parts = _parts()
        for i, part in enumerate(parts):
            if only and part.name not in only:
                continue
            left = deadline - time.monotonic()
            if left < part.min_s:
                results.append(PartResult(part.name, 0.0, error=f"skipped: {left:.0f} s of the budget left"))
                continue
            # what the later parts are given stays theirs; time an earlier part left unused goes to this one
            later = sum(p.timeout_s for p in parts[i + 1:] if not only or p.name in only)
            timeout = min(left, max(part.timeout_s, left - later))
            print(f"gpu_check: {part.name} (at most {timeout:.0f} s) ...", file=sys.stderr, flush=True)
            results.append(part.run(timeout, Path(tmp)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    ap.add_argument("--only", default=None, help="comma-separated parts to run (default: all)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--part", choices=sorted(IN_PROCESS_PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:  # a child: one part measured here, its figures as JSON
        figures = IN_PROCESS_PARTS[args.part]()
        Path(args.out).write_text(json.dumps([asdict(f) for f in figures]))
        return 0
    ok, what = cuda_available()
    if not ok:
        print(f"gpu_check: no CUDA GPU here ({what}): nothing to check")
        return NO_CUDA_EXIT
    t0 = time.monotonic()
    results = run_all(args.budget, args.only.split(",") if args.only else None)
    figures: list[Figure] = []
    for r in results:
        figures += r.figures
        if r.error:
            figures.append(Figure(f"{r.name}: part failed", r.error, passed=False))
    print(f"\n## GPU check on {what} ({time.monotonic() - t0:.0f} s)\n")
    print(markdown_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": what, "parts": [asdict(r) for r in results]}, indent=2))
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
