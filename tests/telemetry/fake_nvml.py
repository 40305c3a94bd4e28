"""A fake ``pynvml`` for tests and benchmarks: the call surface VRAMancer (and gpustat) use,
raising the real ``pynvml`` exception classes with the real NVML return codes, so the error
translation in ``vramancer.devices.nvml`` is tested for real.

Scenarios (factories at the bottom): three GPUs; one GPU lost after N samples; power not
supported; a process whose PID does not exist; an old driver without v2 memory info or v3
process lists; old nvidia-ml-py without the ``version`` argument; no NVML library; driver not loaded.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml as real

__all__ = ["FakeGpu", "FakeNvml", "VANISHED_PID", "MiB", "GiB", "three_gpus", "lost_mid_run",
           "power_not_supported", "vanished_pid", "old_driver", "old_bindings", "no_library",
           "driver_not_loaded"]

MiB = 2**20
GiB = 2**30
VANISHED_PID = 2**31 - 7      # above any pid_max: psutil says NoSuchProcess


@dataclass
class FakeGpu:
    name: str
    uuid: str
    bus_id: str
    total_bytes: int
    used_bytes: int                     # v2 meaning: excludes reserved
    reserved_bytes: int = 300 * MiB
    utilization_pct: int = 0
    power_mw: int | None = 120_000      # None: NVML_ERROR_NOT_SUPPORTED
    temperature_c: int = 40
    sm_clock_mhz: int = 1_500
    mem_clock_mhz: int = 9_500
    processes: list[tuple[int, int | None]] = field(default_factory=list)   # (pid, used bytes)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    lost_after: int | None = None       # memory reads that succeed before NVML_ERROR_GPU_IS_LOST
    pcie_gen: int = 4
    pcie_width: int = 16
    memory_reads: int = 0
    lost: bool = False


class _Handle:
    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


class FakeNvml:
    """Looks like the ``pynvml`` module. ``calls`` counts calls per function name."""

    # the real exception classes and constants
    NVMLError = real.NVMLError
    NVMLLibraryMismatchError = real.NVMLLibraryMismatchError

    def __init__(self, gpus: list[FakeGpu], v2_memory: bool = True, version_kwarg: bool = True,
                 process_v3: bool = True, init_error: int | None = None, p2p: set[tuple[int, int]] | None = None,
                 driver_version: str = "550.54.15"):
        for name in dir(real):
            if name.startswith(("NVML_", "NVMLError_", "nvmlMemory_v")):
                setattr(self, name, getattr(real, name))
        self.gpus = gpus
        self.v2_memory = v2_memory
        self.version_kwarg = version_kwarg
        self.process_v3 = process_v3
        self.init_error = init_error
        self.p2p = set(p2p or set())
        self.driver_version = driver_version
        self.calls: dict[str, int] = {}
        self.init_count = 0
        self._lock = threading.Lock()
        self._handles = [_Handle(i) for i in range(len(gpus))]
        self._nvmlGetFunctionPointer_cache: dict = {}
        if not version_kwarg:
            # nvidia-ml-py older than 11.510: no nvmlMemory_v2 and no version argument
            del self.nvmlMemory_v2

            def nvmlDeviceGetMemoryInfo(handle):  # noqa: N802 - pynvml's name
                return self._memory(handle, None)

            self.nvmlDeviceGetMemoryInfo = nvmlDeviceGetMemoryInfo

    # -- helpers ----------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def _gpu(self, handle: _Handle, name: str) -> FakeGpu:
        self._count(name)
        if self.init_count <= 0:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        return gpu

    # -- life cycle -------------------------------------------------------------------------
    def nvmlInit(self):  # noqa: N802
        self._count("nvmlInit")
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self):  # noqa: N802
        self._count("nvmlShutdown")
        self.init_count = max(0, self.init_count - 1)

    def _nvmlGetFunctionPointer(self, name):  # noqa: N802 - gpustat probes this
        if name == "nvmlDeviceGetMemoryInfo_v2" and not self.v2_memory:
            raise real.NVMLError(real.NVML_ERROR_FUNCTION_NOT_FOUND)
        if name.endswith("RunningProcesses_v3") and not self.process_v3:
            raise real.NVMLError(real.NVML_ERROR_FUNCTION_NOT_FOUND)
        return name

    def nvmlSystemGetDriverVersion(self):  # noqa: N802
        return self.driver_version

    def nvmlDeviceGetCount(self):  # noqa: N802
        self._count("nvmlDeviceGetCount")
        if self.init_count <= 0:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        self._count("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[index].lost:
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        return self._handles[index]

    def nvmlDeviceGetIndex(self, handle):  # noqa: N802
        return handle.index

    # -- identity ---------------------------------------------------------------------------
    def nvmlDeviceGetName(self, handle):  # noqa: N802
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle):  # noqa: N802
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetPciInfo(self, handle):  # noqa: N802
        return SimpleNamespace(busId=self._gpu(handle, "nvmlDeviceGetPciInfo").bus_id)

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle):  # noqa: N802
        return self._gpu(handle, "nvmlDeviceGetMaxPcieLinkGeneration").pcie_gen

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle):  # noqa: N802
        return self._gpu(handle, "nvmlDeviceGetMaxPcieLinkWidth").pcie_width

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):  # noqa: N802
        return self._gpu(handle, "nvmlDeviceGetCurrPcieLinkGeneration").pcie_gen

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):  # noqa: N802
        return self._gpu(handle, "nvmlDeviceGetCurrPcieLinkWidth").pcie_width

    def nvmlDeviceGetP2PStatus(self, h1, h2, p2p_index):  # noqa: N802
        self._gpu(h1, "nvmlDeviceGetP2PStatus")
        self._gpu(h2, "nvmlDeviceGetP2PStatus")
        if not isinstance(p2p_index, int):
            # what ctypes says when pynvml's NVML_P2P_CAPS_INDEX_READ tuple is passed as is
            raise ctypes.ArgumentError(f"argument 3: TypeError: wrong type {type(p2p_index).__name__}")
        ok = (h1.index, h2.index) in self.p2p or (h2.index, h1.index) in self.p2p
        return real.NVML_P2P_STATUS_OK if ok else real.NVML_P2P_STATUS_NOT_SUPPORTED

    # -- memory -----------------------------------------------------------------------------
    def _memory(self, handle, version):
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        if version is not None and not self.v2_memory:
            raise real.NVMLError(real.NVML_ERROR_FUNCTION_NOT_FOUND)
        if gpu.lost_after is not None and gpu.memory_reads >= gpu.lost_after:
            gpu.lost = True
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        gpu.memory_reads += 1
        free = gpu.total_bytes - gpu.used_bytes - gpu.reserved_bytes
        if version is None:   # v1: "used" includes what the driver reserved
            return SimpleNamespace(total=gpu.total_bytes, free=free, used=gpu.used_bytes + gpu.reserved_bytes)
        return SimpleNamespace(version=version, total=gpu.total_bytes, reserved=gpu.reserved_bytes, free=free,
                               used=gpu.used_bytes)

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):  # noqa: N802
        return self._memory(handle, version)

    # -- activity ---------------------------------------------------------------------------
    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.utilization_pct, memory=gpu.utilization_pct // 2)

    def nvmlDeviceGetPowerUsage(self, handle):  # noqa: N802
        gpu = self._gpu(handle, "nvmlDeviceGetPowerUsage")
        if gpu.power_mw is None:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):  # noqa: N802
        self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit")
        raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetTemperature(self, handle, sensor):  # noqa: N802
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetClockInfo(self, handle, clock_type):  # noqa: N802
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        if clock_type == real.NVML_CLOCK_SM:
            return gpu.sm_clock_mhz
        if clock_type == real.NVML_CLOCK_MEM:
            return gpu.mem_clock_mhz
        raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetFanSpeed(self, handle):  # noqa: N802
        self._gpu(handle, "nvmlDeviceGetFanSpeed")
        raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetEncoderUtilization(self, handle):  # noqa: N802
        self._gpu(handle, "nvmlDeviceGetEncoderUtilization")
        return [0, 167000]

    def nvmlDeviceGetDecoderUtilization(self, handle):  # noqa: N802
        self._gpu(handle, "nvmlDeviceGetDecoderUtilization")
        return [0, 167000]

    # -- processes --------------------------------------------------------------------------
    @staticmethod
    def _procs(entries):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for pid, used in entries]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):  # noqa: N802
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        if not self.process_v3:   # pynvml's throwOnVersionMismatch wrapper around FUNCTION_NOT_FOUND
            raise real.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not "
                                                "match the NVML lib version.")
        return self._procs(gpu.processes)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle):  # noqa: N802
        return self._procs(self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses_v2").processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):  # noqa: N802
        gpu = self._gpu(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        if not self.process_v3:
            raise real.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not "
                                                "match the NVML lib version.")
        return self._procs(gpu.graphics_processes)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle):  # noqa: N802
        return self._procs(self._gpu(handle, "nvmlDeviceGetGraphicsRunningProcesses_v2").graphics_processes)


# -- scenarios ------------------------------------------------------------------------------
def _three() -> list[FakeGpu]:
    me = os.getpid()
    return [
        FakeGpu(name="NVIDIA GeForce RTX 3090", uuid="GPU-00000000-3090-0000-0000-000000000000",
                bus_id="00000000:01:00.0", total_bytes=24 * GiB, used_bytes=10 * GiB, utilization_pct=87,
                power_mw=310_500, temperature_c=71, processes=[(me, 9 * GiB)]),
        FakeGpu(name="NVIDIA GeForce RTX 3060", uuid="GPU-00000000-3060-0000-0000-000000000000",
                bus_id="00000000:02:00.0", total_bytes=12 * GiB, used_bytes=5 * GiB, utilization_pct=40,
                power_mw=120_250, temperature_c=60, pcie_width=8, processes=[(me, 4 * GiB)],
                graphics_processes=[(me, 4 * GiB)]),
        FakeGpu(name="Tesla P40", uuid="GPU-00000000-0p40-0000-0000-000000000000",
                bus_id="00000000:03:00.0", total_bytes=24 * GiB, used_bytes=1 * GiB, utilization_pct=0,
                power_mw=50_000, temperature_c=35, pcie_gen=3),
    ]


def three_gpus(**kw) -> FakeNvml:
    """An RTX 3090, an RTX 3060 and a P40; this process on the first two; 3090 <-> 3060 P2P."""
    kw.setdefault("p2p", {(0, 1)})
    return FakeNvml(_three(), **kw)


def lost_mid_run(after: int = 3, index: int = 1) -> FakeNvml:
    """Three GPUs; GPU ``index`` answers NVML_ERROR_GPU_IS_LOST after ``after`` samples."""
    gpus = _three()
    gpus[index].lost_after = after
    return FakeNvml(gpus)


def power_not_supported() -> FakeNvml:
    gpus = _three()
    for g in gpus:
        g.power_mw = None
    return FakeNvml(gpus)


def vanished_pid() -> FakeNvml:
    gpus = _three()
    gpus[0].processes.append((VANISHED_PID, 512 * MiB))
    return FakeNvml(gpus)


def old_driver() -> FakeNvml:
    """A driver before 510: no nvmlDeviceGetMemoryInfo_v2, no v3 process lists."""
    return FakeNvml(_three(), v2_memory=False, process_v3=False)


def old_bindings() -> FakeNvml:
    """nvidia-ml-py before 11.510: nvmlDeviceGetMemoryInfo takes no version argument."""
    return FakeNvml(_three(), version_kwarg=False)


def no_library() -> FakeNvml:
    return FakeNvml([], init_error=real.NVML_ERROR_LIBRARY_NOT_FOUND)


def driver_not_loaded() -> FakeNvml:
    return FakeNvml([], init_error=real.NVML_ERROR_DRIVER_NOT_LOADED)
