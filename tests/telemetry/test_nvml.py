"""NVML access and the NVML sampler, over the fake pynvml with the real exception classes."""
from __future__ import annotations

import os
import sys
import threading

import psutil
import pynvml
import pytest

from vramancer.devices.nvml import (
    FUNCTION_NOT_FOUND,
    NO_PERMISSION,
    NOT_SUPPORTED,
    UNAVAILABLE,
    Absent,
    GpuLostError,
    NvmlBackend,
    NvmlError,
    default_backend,
    gpus,
    nvml_call,
)
from vramancer.telemetry.recorder import Recorder
from vramancer.telemetry.samplers import NvmlSampler

from . import fake_nvml as F
from .fake_nvml import GiB, MiB

ME = os.getpid()
MY_NAME = psutil.Process(ME).name()


# -- backend: lazy start and error translation ------------------------------------------------
def test_nvml_starts_lazily_and_once_across_threads(fake3):
    b = NvmlBackend(module=fake3)
    assert fake3.calls.get("nvmlInit", 0) == 0          # nothing at construction
    results = []
    threads = [threading.Thread(target=lambda: results.append(b.device_count())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [3] * 8
    assert fake3.calls["nvmlInit"] == 1
    b.shutdown()
    assert fake3.init_count == 0
    assert b.device_count() == 3                        # starts again after shutdown
    assert fake3.calls["nvmlInit"] == 2


@pytest.mark.parametrize("code, reason", [
    (pynvml.NVML_ERROR_NOT_SUPPORTED, NOT_SUPPORTED),
    (pynvml.NVML_ERROR_NO_PERMISSION, NO_PERMISSION),
    (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, FUNCTION_NOT_FOUND),
    (pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH, FUNCTION_NOT_FOUND),
])
def test_absent_errors_become_absent(backend3, code, reason):
    def fn(handle):
        raise pynvml.NVMLError(code)

    result = backend3.call(fn, backend3.handle(0))
    assert isinstance(result, Absent) and not result
    assert result.reason == reason and result.function == "fn"


def test_library_mismatch_becomes_absent(backend3):
    def nvmlDeviceGetComputeRunningProcesses(handle):  # noqa: N802
        raise pynvml.NVMLLibraryMismatchError("Unversioned function called")

    result = backend3.call(nvmlDeviceGetComputeRunningProcesses, backend3.handle(0))
    assert result == Absent("nvmlDeviceGetComputeRunningProcesses", FUNCTION_NOT_FOUND)


def test_unknown_function_name_is_absent(backend3):
    assert backend3.call("nvmlDeviceGetSomethingFromTheFuture", backend3.handle(0)) == \
        Absent("nvmlDeviceGetSomethingFromTheFuture", FUNCTION_NOT_FOUND)


def test_gpu_is_lost_raises_with_the_index(backend3):
    h2 = backend3.handle(2)

    def fn(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    with pytest.raises(GpuLostError) as info:
        backend3.call(fn, h2)
    assert info.value.index == 2
    assert "GPU 2 is lost" in str(info.value)


def test_other_errors_are_nvml_errors(backend3):
    def fn(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    with pytest.raises(NvmlError) as info:
        backend3.call(fn, backend3.handle(0))
    assert info.value.code == pynvml.NVML_ERROR_TIMEOUT
    assert "fn" in str(info.value)


def test_uninitialized_restarts_and_retries_once(fake3, backend3):
    assert backend3.device_count() == 3
    fake3.nvmlShutdown()                         # someone else shut NVML down under us
    assert backend3.device_count() == 3          # re-initialised and retried
    assert fake3.calls["nvmlInit"] == 2


@pytest.mark.parametrize("factory, words", [
    (F.no_library, "no NVIDIA driver library"),
    (F.driver_not_loaded, "driver is not loaded"),
])
def test_no_library_or_driver_means_no_devices(factory, words):
    b = NvmlBackend(module=factory())
    assert not b.available()
    assert words in b.unavailable_reason
    assert b.device_count() == 0
    assert gpus(b) == []
    assert b.call("nvmlDeviceGetCount") == Absent("nvmlDeviceGetCount", UNAVAILABLE)
    snap = NvmlSampler(b).sample()
    assert snap.devices == [] and snap.processes == []
    assert snap.missing == [f"nvml: {b.unavailable_reason}"]


def test_no_module_at_all_means_no_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)     # `import pynvml` raises ImportError
    b = NvmlBackend()
    assert not b.available()
    assert "nvidia-ml-py is not installed" in b.unavailable_reason
    assert gpus(b) == []


def test_default_backend_on_this_machine():
    count = nvml_call("nvmlDeviceGetCount")
    if default_backend().available():
        assert isinstance(count, int)
    else:
        assert count == Absent("nvmlDeviceGetCount", UNAVAILABLE)


# -- inventory --------------------------------------------------------------------------------
def test_gpus_inventory_three_gpus(backend3):
    inv = gpus(backend3)
    assert [g.index for g in inv] == [0, 1, 2]
    g0, g1, g2 = inv
    assert g0.name == "NVIDIA GeForce RTX 3090"
    assert g0.uuid == "GPU-00000000-3090-0000-0000-000000000000"
    assert g0.pci_bus_id == "00000000:01:00.0"
    assert g0.total_bytes == 24 * GiB
    assert g0.used_bytes == 10 * GiB
    assert g0.reserved_bytes == 300 * MiB
    assert g0.free_bytes == 24 * GiB - 10 * GiB - 300 * MiB
    assert (g1.pcie_gen, g1.pcie_width) == (4, 8)
    assert (g2.pcie_gen, g2.pcie_width) == (3, 16)
    # P2P read OK between 3090 and 3060 only; pynvml's tuple-valued NVML_P2P_CAPS_INDEX_READ
    # would make ctypes (and the fake) refuse the call.
    assert g0.p2p_peers == (g1.uuid,)
    assert g1.p2p_peers == (g0.uuid,)
    assert g2.p2p_peers == ()


def test_gpus_leaves_out_a_lost_gpu():
    fake = F.lost_mid_run(after=0, index=1)
    inv = gpus(NvmlBackend(module=fake))
    assert [g.index for g in inv] == [0, 2]


def test_gpus_old_driver_uses_v1_memory():
    inv = gpus(NvmlBackend(module=F.old_driver()))
    assert inv[0].reserved_bytes is None
    assert inv[0].used_bytes == 10 * GiB + 300 * MiB       # v1 "used" includes the reserved bytes


# -- sampler ----------------------------------------------------------------------------------
def test_sampler_three_gpus_exact_fields(backend3):
    snap = NvmlSampler(backend3).sample()
    assert snap.phase is None and snap.missing == []
    assert [d.device for d in snap.devices] == ["cuda:0", "cuda:1", "cuda:2"]
    d0 = snap.devices[0]
    assert d0.source == "nvml"
    assert d0.name == "NVIDIA GeForce RTX 3090"
    assert d0.uuid == "GPU-00000000-3090-0000-0000-000000000000"
    assert (d0.used_bytes, d0.total_bytes, d0.reserved_bytes) == (10 * GiB, 24 * GiB, 300 * MiB)
    assert d0.free_bytes == 14 * GiB
    assert d0.utilization_pct == 87.0
    assert d0.power_w == 310.5
    assert d0.temperature_c == 71.0
    assert (d0.sm_clock_mhz, d0.mem_clock_mhz) == (1500.0, 9500.0)
    assert d0.missing == [] and not d0.lost
    # this process on GPU 0, and on GPU 1 in both the compute and graphics lists: one row there
    assert [(p.device, p.pid, p.used_bytes, p.name) for p in snap.processes] == [
        ("cuda:0", ME, 9 * GiB, MY_NAME),
        ("cuda:1", ME, 4 * GiB, MY_NAME),
    ]


def test_sampler_subset_of_indices(backend3):
    snap = NvmlSampler(backend3, indices=[2, 5]).sample()
    assert [d.device for d in snap.devices] == ["cuda:2"]
    assert snap.missing == ["nvml: no GPU 5 (NVML sees 3)"]


def test_gpu_lost_mid_run_is_marked_and_the_others_go_on():
    fake = F.lost_mid_run(after=3, index=1)
    rec = Recorder(samplers=[NvmlSampler(NvmlBackend(module=fake))], interval=0.05)
    for _ in range(6):
        rec.sample_once()
    snaps = rec.snapshots()
    assert [s.devices[1].lost for s in snaps] == [False, False, False, True, True, True]
    for s in snaps[3:]:
        lost = s.devices[1]
        assert lost.device == "cuda:1" and lost.name == "NVIDIA GeForce RTX 3060"
        assert lost.used_bytes is None and lost.total_bytes == 12 * GiB
        assert [p.device for p in s.processes] == ["cuda:0"]
        assert s.devices[0].used_bytes == 10 * GiB and s.devices[2].used_bytes == 1 * GiB
    # once lost, the sampler stops asking that GPU
    reads = fake.calls["nvmlDeviceGetMemoryInfo"]
    rec.sample_once()
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == reads + 2
    peak = rec.peaks().device("cuda:1")
    assert peak.lost and peak.lost_timestamp == snaps[3].timestamp
    assert peak.peak_used_bytes == 5 * GiB


def test_power_not_supported_is_absent_for_that_field_only():
    fake = F.power_not_supported()
    sampler = NvmlSampler(NvmlBackend(module=fake))
    for _ in range(3):
        snap = sampler.sample()
    for d in snap.devices:
        assert d.power_w is None
        assert d.missing == ["power_w"]
        assert d.used_bytes is not None and d.temperature_c is not None
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 3      # asked once per GPU, then remembered


def test_vanished_pid_keeps_its_row_without_a_name():
    snap = NvmlSampler(NvmlBackend(module=F.vanished_pid())).sample()
    rows = {(p.device, p.pid): p for p in snap.processes}
    gone = rows[("cuda:0", F.VANISHED_PID)]
    assert gone.name is None and gone.used_bytes == 512 * MiB
    assert rows[("cuda:0", ME)].name == MY_NAME


def test_old_driver_falls_back_to_v1_memory_and_v2_process_lists():
    fake = F.old_driver()
    sampler = NvmlSampler(NvmlBackend(module=fake))
    for _ in range(3):
        snap = sampler.sample()
    d0 = snap.devices[0]
    assert d0.used_bytes == 10 * GiB + 300 * MiB
    assert d0.reserved_bytes is None and d0.missing == ["reserved_bytes"]
    assert d0.total_bytes == 24 * GiB
    assert [(p.device, p.pid) for p in snap.processes] == [("cuda:0", ME), ("cuda:1", ME)]
    # v2 memory and v3 process lists tried once only, then the old calls every time
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 1 + 3 * 3
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 1
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 3 * 3


def test_old_bindings_without_version_argument():
    snap = NvmlSampler(NvmlBackend(module=F.old_bindings())).sample()
    d0 = snap.devices[0]
    assert d0.used_bytes == 10 * GiB + 300 * MiB and d0.reserved_bytes is None


def test_vanished_process_names_are_forgotten(backend3, fake3):
    sampler = NvmlSampler(backend3)
    sampler.sample()
    fake3.gpus[0].processes = []
    fake3.gpus[1].processes = []
    fake3.gpus[1].graphics_processes = []
    snap = sampler.sample()
    assert snap.processes == []
    assert sampler._names == {}
