"""How fast this machine's CPU runs a transformers model: the figures the cost model uses for host RAM.

A CPU forward of a small or mid-size model is not limited by the vendor's peaks but by what torch
reaches on it, and, for small models, by a fixed cost per layer (a dozen eager ops, ~5 us of
dispatch each) and per generation step (the ``generate`` loop: logits processors, stopping
criteria, the streamer). So these are measured, not looked up:

    bandwidth_bytes_per_s  bytes per second a decode step's fp32 matrix-vector products stream: one
                           token through the 7 projections of width-1536 Llama layers, more
                           bytes than the caches hold, less the ops' thread hand-offs
    gemm_flops_per_s       FLOP/s of a fp32 prefill-shaped matmul (512 x 1024 @ 1024 x 1024)
    block_overhead_s       fixed seconds per block per forward (decode step or prefill chunk), from
                           real transformers decoders at tiny width with one thread: the slope of
                           their decode step over 1, 4 and 9 layers
    step_overhead_s        fixed seconds per generation step beyond its blocks (the ``generate`` loop)
    request_overhead_s     fixed seconds from a ``generate`` call to its first token beyond the
                           prompt's blocks (setup, the first step): what a prefill chunk pays on top
    parallel_op_s          the hand-off between threads each op of a prefill pays once its tensors
                           pass torch's grain size: a width-256 decoder layer's 128-token forward (1
                           layer vs 5), less its matmuls and the block's fixed cost, per op
    decode_parallel_op_s   the same hand-off for the ops a decode step still splits over threads (the
                           matmuls MKL threads and the attention kernel): a tiny decoder's decode step
                           per layer with the threads torch uses less with one thread, per op

The fixed cost per block is measured with one thread (dispatch: what no thread count changes); what
more threads add to a block is the hand-offs, priced per op by the last two figures (0 with one
thread). The costs per step and per request are measured at the thread count itself (what the tiny
decoders' steps and first tokens take beyond their blocks): ``generate``'s own ops hand off too.
On a machine whose other cores are busy a hand-off waits for a core: a few
microseconds on idle cores, milliseconds on busy ones, so measure under the load the runs will see.

``vramancer.runtime.calibrate.measure_host_speed()`` measures them (a few seconds, with the threads
torch uses); ``save_host_speed`` keeps them under the cache folder for this CPU and thread count
(``python benchmarks/cost_model.py --save`` does both), and ``host_speed()`` reads them back (no
torch import). Without a measurement, ``default_host_speed`` scales per-thread figures measured
that way on a 2-core AMD EPYC VM (torch 2.x), the machine the project's benchmarks run on.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

__all__ = ["HostSpeed", "default_host_speed", "host_speed", "save_host_speed", "host_speed_path",
           "host_fingerprint"]

HOST_SPEED_SCHEMA = 2   # 2: the block's fixed cost measured with one thread, decode_parallel_op_s


@dataclass(frozen=True)
class HostSpeed:
    bandwidth_bytes_per_s: float
    gemm_flops_per_s: float
    block_overhead_s: float
    step_overhead_s: float
    request_overhead_s: float = 0.0
    parallel_op_s: float = 0.0
    decode_parallel_op_s: float = 0.0
    threads: int = 0
    fingerprint: str = ""
    source: str = "default"   # "default" or "measured"

    @property
    def tflops(self) -> float:
        return self.gemm_flops_per_s / 1e12

    def to_dict(self) -> dict:
        return {"schema": HOST_SPEED_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> HostSpeed:
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**kw)


# Without a measurement: figures measured with vramancer.runtime.calibrate on the 2-core EPYC VM
# above, lightly loaded. Bandwidth and FLOP/s are per torch thread (1 and 2 threads: GEMV 7.7 and
# 18.6 GB/s, matmul 25 and 54 GFLOP/s) and scale with threads; the bandwidth stops at what a
# desktop's dual-channel DRAM gives a GEMV (~40 GB/s of DDR5's 90 peak). The fixed costs are those
# of one thread there; the hand-offs (only with 2 threads or more) those of 2 threads on 2 lightly
# busy cores (each parallel op waits for the other thread); idle cores do better: measure it.
DEFAULT_BANDWIDTH_PER_THREAD = 6.0e9
DEFAULT_DRAM_BANDWIDTH = 40e9
DEFAULT_GEMM_FLOPS_PER_THREAD = 25e9
DEFAULT_BLOCK_OVERHEAD_S = 0.6e-3
DEFAULT_STEP_OVERHEAD_S = 1.5e-3
DEFAULT_REQUEST_OVERHEAD_S = 20e-3
DEFAULT_PARALLEL_OP_S = 0.3e-3
DEFAULT_DECODE_PARALLEL_OP_S = 0.3e-3


def default_host_speed(threads: int) -> HostSpeed:
    """The unmeasured figures for a CPU running ``threads`` torch threads."""
    t = max(1, threads)
    return HostSpeed(bandwidth_bytes_per_s=min(DEFAULT_DRAM_BANDWIDTH, DEFAULT_BANDWIDTH_PER_THREAD * t),
                     gemm_flops_per_s=DEFAULT_GEMM_FLOPS_PER_THREAD * t,
                     block_overhead_s=DEFAULT_BLOCK_OVERHEAD_S, step_overhead_s=DEFAULT_STEP_OVERHEAD_S,
                     request_overhead_s=DEFAULT_REQUEST_OVERHEAD_S,
                     parallel_op_s=DEFAULT_PARALLEL_OP_S if t > 1 else 0.0,
                     decode_parallel_op_s=DEFAULT_DECODE_PARALLEL_OP_S if t > 1 else 0.0,
                     threads=t, fingerprint=host_fingerprint(t), source="default")


def host_fingerprint(threads: int) -> str:
    """This CPU and thread count, e.g. "x86_64/AMD EPYC/2 cpus/2 threads": a measurement is kept per fingerprint."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    return f"{platform.machine()}/{model or 'cpu'}/{os.cpu_count() or 1} cpus/{threads} threads"


def host_speed_path() -> Path:
    from .._paths import cache_dir

    return cache_dir() / "host-speed.json"


def _default_threads() -> int:
    """The threads torch runs with in this process when it is already imported (run, demo, a
    benchmark that set them), else torch's default: the cores this process may use."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def host_speed(threads: int | None = None) -> HostSpeed:
    """The measured figures for this CPU and thread count when kept, else the defaults for it."""
    t = threads or _default_threads()
    return _read(str(host_speed_path()), host_fingerprint(t), t)


@lru_cache(maxsize=8)
def _read(path: str, fingerprint: str, threads: int) -> HostSpeed:
    try:
        d = json.loads(Path(path).read_text())
        entries = d["hosts"] if d.get("schema") == HOST_SPEED_SCHEMA else {}
        if fingerprint in entries:
            return replace(HostSpeed.from_dict(entries[fingerprint]), source="measured")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return default_host_speed(threads)


def save_host_speed(speed: HostSpeed) -> Path:
    """Keep ``speed`` for its fingerprint (atomically; other fingerprints in the file stay)."""
    path = host_speed_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        d = json.loads(path.read_text())
        hosts = d["hosts"] if d.get("schema") == HOST_SPEED_SCHEMA and isinstance(d.get("hosts"), dict) else {}
    except (OSError, ValueError, KeyError, AttributeError):
        hosts = {}
    hosts[speed.fingerprint] = speed.to_dict()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"schema": HOST_SPEED_SCHEMA, "hosts": hosts}, indent=2))
    tmp.replace(path)
    _read.cache_clear()
    return path
