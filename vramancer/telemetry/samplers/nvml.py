"""NVIDIA GPUs through NVML (``vramancer.devices.nvml``): memory (v2, v1 fallback), utilization,
power, temperature, SM / memory clocks, and the memory each compute or graphics process holds.

A field the driver does not support is None and named in ``DeviceSample.missing`` (asked once,
then remembered); a GPU that is lost becomes ``DeviceSample(lost=True)`` and stays lost while the
others go on; a process that vanished between NVML's list and psutil keeps its row with name None.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...devices.nvml import FUNCTION_NOT_FOUND, Absent, GpuLostError, NvmlBackend, NvmlError, default_backend
from ..samples import DeviceSample, ProcessSample, Snapshot
from .base import now

__all__ = ["NvmlSampler", "process_name"]

log = logging.getLogger(__name__)


def process_name(pid: int) -> str | None:
    """The process name psutil reads, or None when the process is gone or hidden from us."""
    import psutil

    try:
        return psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
        return None


@dataclass
class _Gpu:
    index: int
    handle: Any
    device: str
    name: str
    uuid: str | None
    total_bytes: int | None = None
    lost: bool = False
    unsupported: dict[str, str] = field(default_factory=dict)   # field -> reason, asked once


class NvmlSampler:
    """Samples NVIDIA GPUs ``indices`` (all when None) through ``backend`` (the default one)."""

    name = "nvml"

    def __init__(self, backend: NvmlBackend | None = None, indices: Sequence[int] | None = None,
                 process_names: bool = True):
        self._backend = backend or default_backend()
        self._indices = list(indices) if indices is not None else None
        self._process_names = process_names
        self._gpus: dict[int, _Gpu] = {}
        self._names: dict[int, str] = {}          # pid -> name, for the pids on a GPU now
        self._absent_functions: set[str] = set()  # process-list functions this driver lacks

    @property
    def backend(self) -> NvmlBackend:
        return self._backend

    def available(self) -> bool:
        return self._backend.available()

    def close(self) -> None:
        self._gpus.clear()
        self._names.clear()

    # -- sampling ---------------------------------------------------------------------------
    def sample(self) -> Snapshot:
        ts = now()
        b = self._backend
        if not b.available():
            return Snapshot(timestamp=ts, missing=[f"nvml: {b.unavailable_reason}"])
        count = b.device_count()
        indices = self._indices if self._indices is not None else list(range(count))
        devices: list[DeviceSample] = []
        processes: list[ProcessSample] = []
        missing: list[str] = []
        for index in indices:
            if index >= count:
                missing.append(f"nvml: no GPU {index} (NVML sees {count})")
                continue
            try:
                gpu = self._gpu(index)
            except GpuLostError:
                devices.append(DeviceSample(device=f"cuda:{index}", name=f"NVIDIA GPU {index}",
                                            source=self.name, lost=True))
                continue
            except NvmlError as e:
                missing.append(f"nvml: GPU {index}: {e}")
                continue
            if gpu.lost:
                devices.append(self._lost_sample(gpu))
                continue
            try:
                dev, procs = self._sample_gpu(gpu)
            except GpuLostError as e:
                log.warning("%s", e)
                gpu.lost = True
                devices.append(self._lost_sample(gpu))
                continue
            devices.append(dev)
            processes.extend(procs)
        self._forget_names({p.pid for p in processes})
        return Snapshot(timestamp=ts, devices=devices, processes=processes, missing=missing)

    def _gpu(self, index: int) -> _Gpu:
        gpu = self._gpus.get(index)
        if gpu is not None:
            return gpu
        b = self._backend
        handle = b.handle(index)
        if isinstance(handle, Absent):
            raise NvmlError(f"no handle: {handle}")
        name = b.call("nvmlDeviceGetName", handle)
        uuid = b.call("nvmlDeviceGetUUID", handle)
        gpu = _Gpu(index=index, handle=handle, device=f"cuda:{index}",
                   name=_text(name) if not isinstance(name, Absent) else f"NVIDIA GPU {index}",
                   uuid=_text(uuid) if not isinstance(uuid, Absent) else None)
        self._gpus[index] = gpu
        return gpu

    def _lost_sample(self, gpu: _Gpu) -> DeviceSample:
        return DeviceSample(device=gpu.device, name=gpu.name, source=self.name, uuid=gpu.uuid,
                            total_bytes=gpu.total_bytes, lost=True)

    def _field(self, gpu: _Gpu, key: str, missing: list[str], fn: str, *args: Any) -> Any:
        """One NVML read for field ``key``: None (and ``key`` in ``missing``) when absent."""
        if key in gpu.unsupported:
            missing.append(key)
            return None
        try:
            value = self._backend.call(fn, gpu.handle, *args)
        except NvmlError as e:       # transient (timeout, unknown): missing this tick only
            log.debug("GPU %d %s: %s", gpu.index, key, e)
            missing.append(key)
            return None
        if isinstance(value, Absent):
            gpu.unsupported[key] = value.reason
            missing.append(key)
            return None
        return value

    def _sample_gpu(self, gpu: _Gpu) -> tuple[DeviceSample, list[ProcessSample]]:
        b = self._backend
        mod = b.module
        missing: list[str] = []
        used = total = reserved = None
        if "memory" in gpu.unsupported:
            missing += ["used_bytes", "total_bytes", "reserved_bytes"]
        else:
            try:
                mem = b.memory(gpu.handle)
            except NvmlError as e:
                log.debug("GPU %d memory: %s", gpu.index, e)
                mem = None
            if isinstance(mem, Absent):
                gpu.unsupported["memory"] = mem.reason
            if not mem:
                missing += ["used_bytes", "total_bytes", "reserved_bytes"]
            else:
                used, total, reserved = mem.used_bytes, mem.total_bytes, mem.reserved_bytes
                gpu.total_bytes = total
                if reserved is None:
                    missing.append("reserved_bytes")
        util = self._field(gpu, "utilization_pct", missing, "nvmlDeviceGetUtilizationRates")
        power_mw = self._field(gpu, "power_w", missing, "nvmlDeviceGetPowerUsage")
        temp = self._field(gpu, "temperature_c", missing, "nvmlDeviceGetTemperature",
                           getattr(mod, "NVML_TEMPERATURE_GPU", 0))
        sm = self._field(gpu, "sm_clock_mhz", missing, "nvmlDeviceGetClockInfo", getattr(mod, "NVML_CLOCK_SM", 1))
        mem_clk = self._field(gpu, "mem_clock_mhz", missing, "nvmlDeviceGetClockInfo",
                              getattr(mod, "NVML_CLOCK_MEM", 2))
        procs = self._processes(gpu, missing)
        dev = DeviceSample(
            device=gpu.device, name=gpu.name, source=self.name, uuid=gpu.uuid,
            used_bytes=used, total_bytes=total, reserved_bytes=reserved,
            utilization_pct=float(util.gpu) if util is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            sm_clock_mhz=float(sm) if sm is not None else None,
            mem_clock_mhz=float(mem_clk) if mem_clk is not None else None,
            missing=missing,
        )
        return dev, procs

    def _running(self, gpu: _Gpu, kind: str) -> list | Absent:
        """Compute or graphics processes: the v3 call, then v2 on drivers older than 510."""
        last: Absent = Absent(f"nvmlDeviceGet{kind}RunningProcesses", FUNCTION_NOT_FOUND)
        for fn in (f"nvmlDeviceGet{kind}RunningProcesses", f"nvmlDeviceGet{kind}RunningProcesses_v2"):
            if fn in self._absent_functions:
                continue
            value = self._backend.call(fn, gpu.handle)
            if not isinstance(value, Absent):
                return list(value)
            last = value
            if value.reason != FUNCTION_NOT_FOUND:
                return value
            self._absent_functions.add(fn)
        return last

    def _processes(self, gpu: _Gpu, missing: list[str]) -> list[ProcessSample]:
        if "processes" in gpu.unsupported:
            missing.append("processes")
            return []
        used_by_pid: dict[int, int | None] = {}
        absent: list[Absent] = []
        failed = 0
        for kind in ("Compute", "Graphics"):
            try:
                listed = self._running(gpu, kind)
            except NvmlError as e:     # transient: missing this tick only
                log.debug("GPU %d %s processes: %s", gpu.index, kind, e)
                failed += 1
                continue
            if isinstance(listed, Absent):
                absent.append(listed)
                continue
            for p in listed:
                pid = int(p.pid)
                mem = getattr(p, "usedGpuMemory", None)
                mem = int(mem) if mem is not None else None
                # A process in both lists (compute + graphics) holds one allocation: keep the larger.
                prev = used_by_pid.get(pid)
                used_by_pid[pid] = mem if prev is None else max(prev, mem or 0)
        if len(absent) == 2:           # the driver gives neither list: stop asking
            gpu.unsupported["processes"] = absent[0].reason
        if len(absent) + failed == 2:
            missing.append("processes")
            return []
        return [ProcessSample(device=gpu.device, pid=pid, used_bytes=mem, name=self._name(pid))
                for pid, mem in sorted(used_by_pid.items())]

    def _name(self, pid: int) -> str | None:
        if not self._process_names:
            return None
        name = self._names.get(pid)
        if name is None:
            name = process_name(pid)
            if name is not None:
                self._names[pid] = name
        return name

    def _forget_names(self, pids: set[int]) -> None:
        for pid in [p for p in self._names if p not in pids]:
            del self._names[pid]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
