"""The other samplers: host RAM, torch allocator, AMD SMI (fake module), simulated, replay;
and default_samplers' choice."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

from vramancer.devices.device import Device
from vramancer.errors import DeviceSpecError, TraceFileError
from vramancer.telemetry.export import write_json
from vramancer.telemetry.recorder import Recorder
from vramancer.telemetry.samplers import (
    AmdSmiSampler,
    HostSampler,
    NvmlSampler,
    ReplaySampler,
    Sampler,
    SimulatedSampler,
    TorchAllocatorSampler,
    default_samplers,
)
from vramancer.telemetry.samples import DeviceSample, ProcessSample, Snapshot

from .fake_nvml import GiB, MiB

ROOT = Path(__file__).resolve().parents[2]


def test_every_sampler_keeps_the_protocol(tmp_path):
    trace = write_json(tmp_path / "t.json", [Snapshot(1.0, [DeviceSample("a", "a", "nvml", used_bytes=1)])])
    for s in (HostSampler(), TorchAllocatorSampler(), SimulatedSampler(lambda: []), ReplaySampler(trace),
              AmdSmiSampler(module=_fake_amdsmi()), NvmlSampler()):
        assert isinstance(s, Sampler)
        assert isinstance(s.sample(), Snapshot)
        s.close()


def test_host_sampler_reads_psutil():
    snap = HostSampler().sample()
    (cpu,) = snap.devices
    total = psutil.virtual_memory().total
    assert (cpu.device, cpu.source, cpu.total_bytes) == ("cpu", "host", total)
    assert 0 < cpu.used_bytes <= total
    assert cpu.utilization_pct is None or 0.0 <= cpu.utilization_pct <= 100.0


def test_host_sampler_busy_percent_between_samples():
    times = iter([(10.0, 5.0, 80.0, 5.0, 1.0), (11.0, 6.0, 80.5, 5.5, 2.0), (11.0, 6.0, 80.5, 5.5, 2.0)])

    fake = types.SimpleNamespace(cpu_times=lambda: _Times(*next(times)),
                                 virtual_memory=lambda: types.SimpleNamespace(total=64 * GiB, available=40 * GiB))
    s = HostSampler(module=fake)
    first = s.sample().devices[0]
    # 1 s user + 1 s system + 0.5 s idle + 0.5 s iowait (+1 s guest, already inside user): 3 s, 1 s idle
    assert (first.used_bytes, first.total_bytes) == (24 * GiB, 64 * GiB)
    assert first.utilization_pct == pytest.approx(100.0 * 2 / 3)
    second = s.sample().devices[0]            # no CPU time passed: unknown, not 0
    assert second.utilization_pct is None and second.missing == ["utilization_pct"]


_Times = collections.namedtuple("scputimes", "user system idle iowait guest")   # like psutil's


# -- torch allocator --------------------------------------------------------------------------
class _FakeCuda:
    def __init__(self, initialized: bool = True):
        self.initialized = initialized
        self.allocated = {0: 3 * GiB, 1: 1 * GiB}

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def device_count(self):
        return 2

    def memory_allocated(self, i):
        return self.allocated[i]

    def memory_reserved(self, i):
        return self.allocated[i] + 512 * MiB

    def max_memory_allocated(self, i):
        return self.allocated[i] * 2

    def get_device_properties(self, i):
        return types.SimpleNamespace(name=f"GPU{i}", total_memory=24 * GiB,
                                     uuid=f"0000000{i}-aaaa-bbbb-cccc-dddddddddddd")


def _fake_torch(initialized=True, mps=False):
    backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: mps))
    mps_mod = types.SimpleNamespace(current_allocated_memory=lambda: 100, driver_allocated_memory=lambda: 200,
                                    recommended_max_memory=lambda: 1000)
    return types.SimpleNamespace(cuda=_FakeCuda(initialized), backends=backends, mps=mps_mod)


def test_torch_allocator_sampler_reads_the_allocator():
    snap = TorchAllocatorSampler(module=_fake_torch(mps=True)).sample()
    d0, d1, mps = snap.devices
    assert (d0.device, d0.source, d0.used_bytes, d0.reserved_bytes, d0.peak_bytes, d0.total_bytes) == (
        "torch:cuda:0", "torch", 3 * GiB, 3 * GiB + 512 * MiB, 6 * GiB, 24 * GiB)
    assert d0.uuid == "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"     # NVML's spelling
    assert d1.device == "torch:cuda:1" and d1.used_bytes == 1 * GiB
    assert (mps.device, mps.used_bytes, mps.reserved_bytes, mps.total_bytes) == ("torch:mps", 100, 200, 1000)
    only1 = TorchAllocatorSampler(indices=[1], module=_fake_torch()).sample()
    assert [d.device for d in only1.devices] == ["torch:cuda:1"]


def test_torch_allocator_never_creates_a_cuda_context():
    assert TorchAllocatorSampler(module=_fake_torch(initialized=False)).sample().devices == []


def test_torch_allocator_never_imports_torch():
    code = ("import sys; from vramancer.telemetry.samplers import default_samplers, TorchAllocatorSampler; "
            "s = TorchAllocatorSampler(); snap = s.sample(); default_samplers('cpu')[0].sample(); "
            "import vramancer; r = vramancer.track(interval=0.05); r.close(); "
            "assert snap.devices == [] and 'torch' not in sys.modules, sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_torch_allocator_with_real_cpu_torch():
    torch = pytest.importorskip("torch")
    snap = TorchAllocatorSampler(module=torch).sample()
    if not torch.cuda.is_available():
        assert [d for d in snap.devices if d.device.startswith("torch:cuda")] == []


# -- AMD SMI ----------------------------------------------------------------------------------
class AmdSmiException(Exception):
    pass


def _fake_amdsmi(power_na: bool = False):
    m = types.ModuleType("amdsmi")
    m.AmdSmiException = AmdSmiException
    m.AmdSmiInitFlags = types.SimpleNamespace(INIT_AMD_GPUS=1)
    m.AmdSmiMemoryType = types.SimpleNamespace(VRAM=0, VIS_VRAM=1, GTT=2)
    m.AmdSmiTemperatureType = types.SimpleNamespace(EDGE=0, HOTSPOT=1)
    m.AmdSmiTemperatureMetric = types.SimpleNamespace(CURRENT=0)
    m.AmdSmiClkType = types.SimpleNamespace(GFX=0, MEM=1)
    m.state = {"init": 0, "shutdown": 0}
    handles = ["h0", "h1"]

    def init(flags=None):
        m.state["init"] += 1

    def temp(h, sensor, metric):
        if h == "h1" and sensor == 0:          # an Instinct part: no edge sensor
            raise AmdSmiException("EDGE not supported")
        return 55 if h == "h0" else 80

    m.amdsmi_init = init
    m.amdsmi_shut_down = lambda: m.state.__setitem__("shutdown", m.state["shutdown"] + 1)
    m.amdsmi_get_processor_handles = lambda: handles
    m.amdsmi_get_gpu_asic_info = lambda h: {"market_name": {"h0": "Radeon RX 7900 XTX", "h1": "MI300X"}[h]}
    m.amdsmi_get_gpu_device_uuid = lambda h: f"uuid-{h}"
    m.amdsmi_get_gpu_memory_total = lambda h, t: {"h0": 24 * GiB, "h1": 192 * GiB}[h]
    m.amdsmi_get_gpu_memory_usage = lambda h, t: {"h0": 7 * GiB, "h1": 100 * GiB}[h]
    m.amdsmi_get_gpu_activity = lambda h: {"gfx_activity": 42, "umc_activity": 10, "mm_activity": "N/A"}
    m.amdsmi_get_power_info = lambda h: ({"current_socket_power": "N/A", "average_socket_power": "N/A"} if power_na
                                         else {"current_socket_power": 250, "average_socket_power": 240})
    m.amdsmi_get_temp_metric = temp
    m.amdsmi_get_clock_info = lambda h, clk: {"clk": 2500 if clk == 0 else 1250}
    m.amdsmi_get_gpu_process_list = lambda h: ([{"name": "python", "pid": 77, "mem": 5,
                                                 "memory_usage": {"vram_mem": 6 * GiB, "gtt_mem": 0, "cpu_mem": 0}}]
                                               if h == "h0" else [])
    return m


def test_amdsmi_sampler_reads_each_field():
    mod = _fake_amdsmi()
    s = AmdSmiSampler(module=mod)
    snap = s.sample()
    a, b = snap.devices
    assert (a.device, a.name, a.source, a.uuid) == ("rocm:0", "Radeon RX 7900 XTX", "amdsmi", "uuid-h0")
    assert (a.used_bytes, a.total_bytes, a.utilization_pct, a.power_w, a.temperature_c) == (
        7 * GiB, 24 * GiB, 42.0, 250.0, 55.0)
    assert (a.sm_clock_mhz, a.mem_clock_mhz) == (2500.0, 1250.0)
    assert a.missing == ["reserved_bytes"]
    assert b.temperature_c == 80.0 and b.total_bytes == 192 * GiB     # hotspot when there is no edge sensor
    assert snap.processes == [ProcessSample("rocm:0", 77, 6 * GiB, "python")]
    s.sample()
    assert mod.state["init"] == 1
    s.close()
    assert mod.state["shutdown"] == 1


def test_amdsmi_unsupported_field_is_missing():
    snap = AmdSmiSampler(module=_fake_amdsmi(power_na=True), indices=[0, 3]).sample()
    (a,) = snap.devices
    assert a.power_w is None and "power_w" in a.missing
    assert snap.missing == ["amdsmi: no GPU 3 (AMD SMI sees 2)"]


def test_amdsmi_absent_when_it_does_not_start():
    broken = _fake_amdsmi()

    def fail(flags=None):
        raise AmdSmiException("no amdgpu driver")

    broken.amdsmi_init = fail
    s = AmdSmiSampler(module=broken)
    assert not s.available()
    snap = s.sample()
    assert snap.devices == [] and "no amdgpu driver" in snap.missing[0]


def test_amdsmi_absent_when_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    s = AmdSmiSampler()
    assert not s.available()
    assert s.sample().missing[0].startswith("amdsmi: amdsmi does not import (ModuleNotFoundError")


# -- simulated and replay ---------------------------------------------------------------------
def test_simulated_sampler_reports_what_the_runtime_accounts():
    accounted = {"stage0@rtx3090#0": 10 * GiB, "stage1@rtx3060#0": 4 * GiB}

    def source():
        return [DeviceSample(device=k, name=k, source="simulated", used_bytes=v, total_bytes=12 * GiB)
                for k, v in accounted.items()]

    rec = Recorder(samplers=[SimulatedSampler(source)], interval=1)
    rec.sample_once()
    accounted["stage1@rtx3060#0"] = 11 * GiB
    rec.sample_once()
    peak = rec.peaks().device("stage1@rtx3060#0")
    assert peak.peak_used_bytes == 11 * GiB and peak.headroom_bytes == 1 * GiB


def _trace(tmp_path):
    snaps = [Snapshot(100.0 + t, [DeviceSample("cuda:0", "g", "nvml", used_bytes=int(t * 10), total_bytes=100)],
                      phase="load" if t < 2 else "decode") for t in range(5)]
    return write_json(tmp_path / "trace.json", snaps)


def test_replay_as_fast_as_asked(tmp_path):
    r = ReplaySampler(_trace(tmp_path), speed=None)
    got = [r.sample() for _ in range(6)]
    assert [s.devices[0].used_bytes for s in got] == [0, 10, 20, 30, 40, 40]
    assert [s.phase for s in got[:3]] == ["load", "load", "decode"]
    assert all(s.devices[0].source == "replay" for s in got)
    assert r.finished and got[-1].missing == ["replay: end of trace"]
    looped = ReplaySampler(_trace(tmp_path), speed=None, loop=True)
    assert [looped.sample().devices[0].used_bytes for _ in range(7)] == [0, 10, 20, 30, 40, 0, 10]


def test_replay_at_recorded_pace(tmp_path):
    now = [50.0]
    r = ReplaySampler(_trace(tmp_path), speed=2.0, clock=lambda: now[0])
    seen = []
    for dt in (0.0, 0.4, 0.6, 1.1, 5.0):
        now[0] = 50.0 + dt
        seen.append(r.sample().devices[0].used_bytes)
    # at twice the recorded pace: trace time = 2 x wall time
    assert seen == [0, 0, 10, 20, 40]
    assert r.finished


def test_replay_phase_reaches_the_recorder_unless_it_has_its_own(tmp_path):
    rec = Recorder(samplers=[ReplaySampler(_trace(tmp_path), speed=None)], interval=1)
    rec.sample_once()
    with rec.phase("mine"):
        rec.sample_once()
    rec.sample_once()
    assert [s.phase for s in rec.snapshots()] == ["load", "mine", "decode"]


def test_replay_of_an_empty_or_bad_trace(tmp_path):
    empty = write_json(tmp_path / "empty.json", [])
    with pytest.raises(TraceFileError, match="no samples to replay"):
        ReplaySampler(empty)
    with pytest.raises(TraceFileError, match="speed"):
        ReplaySampler(_trace(tmp_path), speed=0)


# -- default_samplers -------------------------------------------------------------------------
def _kinds(samplers):
    return [type(s).__name__ for s in samplers]


def test_default_samplers_auto_picks_what_is_here():
    kinds = _kinds(default_samplers())
    assert kinds[-2:] == ["TorchAllocatorSampler", "HostSampler"]
    assert ("NvmlSampler" in kinds) == NvmlSampler().available()
    assert _kinds(default_samplers("auto")) == kinds


def test_default_samplers_from_a_spec():
    assert _kinds(default_samplers("cpu")) == ["HostSampler"]
    s = default_samplers("cuda:1,cuda:0:20GiB,cpu:64GiB,disk")
    assert _kinds(s) == ["NvmlSampler", "TorchAllocatorSampler", "HostSampler"]
    assert s[0]._indices == [0, 1]
    assert _kinds(default_samplers("rocm:0,mps")) == ["AmdSmiSampler", "TorchAllocatorSampler"]
    for bad in ("rtx3090", "auto,cpu", "cuda:x"):
        with pytest.raises(DeviceSpecError):
            default_samplers(bad)


def test_default_samplers_from_devices():
    def dev(id_, kind, **kw):
        return Device(id=id_, name=id_, kind=kind, total_bytes=1, free_bytes=1, bandwidth_bytes_per_s=1, tflops=1, **kw)

    s = default_samplers([dev("cuda:1", "gpu", vendor="nvidia"), dev("cpu", "cpu"), dev("disk", "disk")])
    assert _kinds(s) == ["NvmlSampler", "TorchAllocatorSampler", "HostSampler"] and s[0]._indices == [1]
    amd = default_samplers([dev("cuda:0", "gpu", vendor="amd")])
    assert _kinds(amd) == ["AmdSmiSampler", "TorchAllocatorSampler"]
    with pytest.raises(DeviceSpecError, match="simulated"):
        default_samplers([dev("rtx3090#0", "gpu", simulated=True)])
