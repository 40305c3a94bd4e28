"""What telemetry costs: CPU of background sampling, CPU per query against gpustat / nvitop on the
same data, and latency from a sample to a subscriber (what the live views read).

1. Sampling cost: a Recorder sampling in its background thread for ``--duration`` seconds at 1 s
   and at 10 Hz; cost = this process's CPU time / wall time (100% = one core). Sampler sets:
     none              a Recorder with no sampler (the thread's own floor)
     here              default_samplers() on this machine (NVML when a driver is here, host RAM, ...)
     fake NVML x3      NvmlSampler over the fake 3-GPU pynvml of the tests + host RAM (the NVML path
                       without a GPU: our Python, not the driver's time)
   Goals: < 1% of one core at 1 s, < 3% at 10 Hz.
2. CPU per query, each tool in its own subprocess on the same NVML (the fake, and the real driver
   when there is one): ours = NvmlSampler.sample() (memory v2, utilization, power, temperature,
   clocks, processes + names); gpustat = gpustat.new_query() (the same fields, plus fan, encoder,
   power limit, process owner / command line / CPU%; it starts and shuts NVML down per query);
   nvitop = Device.all() and each device's memory / utilization / power / temperature / clocks /
   processes (real driver only: nvitop introspects the real pynvml module). A tool that is not
   installed says so.
3. Latency: a Recorder at 0.05 s over the fake NVML x3 + host RAM; a subscriber blocking on
   ``Subscription.get``; latency = receipt time - the snapshot's timestamp (taken when its tick
   starts, so it includes the sampling itself). The dashboard's SSE hop is measured by the UI's
   own tests, not here.

Run:  python benchmarks/telemetry.py [--duration 10] [--queries 300] [--json FILE]
A benchmark, not a test: it always exits 0 and prints "GOAL MET" / "GOAL NOT MET" per goal.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout: make the package (and the fakes) importable
    sys.path.insert(0, str(ROOT))

__all__ = ["sampling_cost", "query_cost", "latency", "main"]

GOALS = {1.0: 1.0, 0.1: 3.0}      # interval s -> max % of one core


def _fake_nvml():
    from tests.telemetry import fake_nvml

    return fake_nvml.three_gpus()


def _samplers(kind: str) -> list:
    from vramancer.devices.nvml import NvmlBackend
    from vramancer.telemetry.samplers import HostSampler, NvmlSampler, default_samplers

    if kind == "none":
        return []
    if kind == "here":
        return default_samplers()
    if kind == "fake NVML x3":
        return [NvmlSampler(NvmlBackend(module=_fake_nvml())), HostSampler()]
    raise ValueError(kind)


def sampling_cost(kind: str, interval: float, duration: float) -> dict:
    """CPU time / wall time of this process while a Recorder samples ``kind`` in the background."""
    from vramancer.telemetry.recorder import Recorder

    samplers = _samplers(kind)
    names = ",".join(s.name for s in samplers) or "-"
    rec = Recorder(samplers=samplers, interval=interval)
    rec.sample_once()                       # warm up: NVML start, handles, psutil
    cpu0, wall0 = time.process_time(), time.monotonic()
    rec.start()
    time.sleep(duration)
    rec.stop()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    rec.close()
    return {"samplers": kind, "names": names, "interval_s": interval, "wall_s": wall, "cpu_s": cpu,
            "ticks": rec.ticks - 1, "cpu_pct": 100.0 * cpu / wall,
            "cpu_us_per_tick": 1e6 * cpu / max(1, rec.ticks - 1)}


# -- per-query workers (each in its own process) ---------------------------------------------
def _worker(tool: str, nvml: str, queries: int) -> dict:
    if nvml == "fake":
        fake = _fake_nvml()
        sys.modules["pynvml"] = fake        # for gpustat / nvitop: they `import pynvml`
    if tool == "ours":
        from vramancer.devices.nvml import NvmlBackend
        from vramancer.telemetry.samplers import NvmlSampler

        sampler = NvmlSampler(NvmlBackend(module=fake if nvml == "fake" else None))
        if not sampler.available():
            return {"error": "NVML unavailable"}

        def query() -> Any:
            return sampler.sample()
    elif tool == "gpustat":
        if importlib.util.find_spec("gpustat") is None:
            return {"error": "not installed"}
        import gpustat

        def query() -> Any:
            return gpustat.new_query()
    elif tool == "nvitop":
        if importlib.util.find_spec("nvitop") is None:
            return {"error": "not installed"}
        if nvml == "fake":
            return {"error": "skipped: nvitop introspects the real pynvml module (vars, ctypes), no fake fits"}
        from nvitop import Device

        def query() -> Any:
            out = []
            for d in Device.all():
                out.append((d.memory_used(), d.memory_total(), d.gpu_utilization(), d.power_usage(),
                            d.temperature(), d.sm_clock(), d.memory_clock(),
                            [(p.pid, p.gpu_memory(), p.name()) for p in d.processes().values()]))
            return out
    else:
        raise ValueError(tool)
    try:
        query()                              # warm up
    except Exception as e:  # noqa: BLE001 - report why the anchor could not run
        return {"error": f"{type(e).__name__}: {e}"}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(queries):
        query()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"queries": queries, "cpu_us_per_query": 1e6 * cpu / queries, "wall_ms_per_query": 1e3 * wall / queries}


def query_cost(tool: str, nvml: str, queries: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", tool, nvml, str(queries)], capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency(samples: int = 100, interval: float = 0.05) -> dict:
    from vramancer.telemetry.recorder import Recorder

    rec = Recorder(samplers=_samplers("fake NVML x3"), interval=interval)
    sub = rec.subscribe(maxsize=samples + 10)
    lat = []
    with rec:
        for _ in range(samples):
            snap = sub.get(timeout=10)
            lat.append(rec.now() - snap.timestamp)
    lat.sort()
    return {"samples": len(lat), "interval_s": interval, "median_ms": 1e3 * statistics.median(lat),
            "p95_ms": 1e3 * lat[int(0.95 * (len(lat) - 1))], "max_ms": 1e3 * lat[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of background sampling per row (default 10)")
    p.add_argument("--queries", type=int, default=300, help="queries per tool for the per-query CPU (default 300)")
    p.add_argument("--gpustat-queries", type=int, default=25,
                   help="gpustat sleeps 0.1 s per GPU with processes in each query: fewer (default 25)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--worker", nargs=3, metavar=("TOOL", "NVML", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        tool, nvml, n = args.worker
        print(json.dumps(_worker(tool, nvml, int(n))))
        return 0

    from vramancer.devices.nvml import NvmlBackend

    results: dict[str, Any] = {"sampling": [], "queries": [], "latency": None}
    print(f"1. background sampling cost ({args.duration:g} s per row; 100% = one core)")
    print(f"   {'samplers':<14} {'sampler names':<26} {'interval':>8} {'ticks':>6} {'CPU/tick':>10} "
          f"{'CPU %':>8} {'goal':>6}  verdict")
    for kind in ("none", "here", "fake NVML x3"):
        for interval in (1.0, 0.1):
            r = sampling_cost(kind, interval, args.duration)
            goal = GOALS[interval]
            r["goal_pct"] = goal
            r["met"] = r["cpu_pct"] < goal
            results["sampling"].append(r)
            print(f"   {kind:<14} {r['names']:<26} {interval:>7g}s {r['ticks']:>6} "
                  f"{r['cpu_us_per_tick']:>8.0f}us {r['cpu_pct']:>7.3f}% {goal:>5g}%  "
                  f"{'GOAL MET' if r['met'] else 'GOAL NOT MET'}")

    print("\n2. CPU per query on the same NVML (each tool in its own process; ratio = tool / ours)")
    nvmls = ["fake"] + (["real"] if NvmlBackend().available() else [])
    if "real" not in nvmls:
        print("   (no NVIDIA driver here: the real-driver rows are skipped)")
    print(f"   {'nvml':<6} {'tool':<9} {'queries':>7} {'CPU/query':>11} {'wall/query':>11} {'ratio':>7}")
    for nvml in nvmls:
        ours = None
        for tool in ("ours", "gpustat", "nvitop"):
            n = args.gpustat_queries if tool == "gpustat" else args.queries
            r = query_cost(tool, nvml, n)
            r.update(tool=tool, nvml=nvml)
            results["queries"].append(r)
            if "error" in r:
                print(f"   {nvml:<6} {tool:<9} {r['error']}")
                continue
            if tool == "ours":
                ours = r["cpu_us_per_query"]
            ratio = f"{r['cpu_us_per_query'] / ours:6.2f}x" if ours else "-"
            r["ratio_to_ours"] = r["cpu_us_per_query"] / ours if ours else None
            print(f"   {nvml:<6} {tool:<9} {r['queries']:>7} {r['cpu_us_per_query']:>9.0f}us "
                  f"{r['wall_ms_per_query']:>9.2f}ms {ratio:>7}")

    lat = latency()
    results["latency"] = lat
    print(f"\n3. sample -> subscriber latency at {lat['interval_s']:g} s over the fake NVML x3 + host RAM "
          f"({lat['samples']} samples): median {lat['median_ms']:.2f} ms, p95 {lat['p95_ms']:.2f} ms, "
          f"max {lat['max_ms']:.2f} ms (includes the sampling itself)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
