"""AMD GPUs through AMD SMI (the ``amdsmi`` module ROCm ships), when it imports and starts.

Device ids are "rocm:N" in AMD SMI's order. Memory is ``amdsmi_get_gpu_memory_usage`` /
``amdsmi_get_gpu_memory_total`` for VRAM (bytes); utilization ``gfx_activity``; power the
current (else average) socket power in W; temperature the edge sensor (hotspot on parts without
one); clocks from ``amdsmi_get_clock_info``; processes from ``amdsmi_get_gpu_process_list``.
A call that raises ``AmdSmiException`` or answers "N/A" is that field missing.
"""
from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..samples import DeviceSample, ProcessSample, Snapshot
from .base import now

__all__ = ["AmdSmiSampler"]

log = logging.getLogger(__name__)


class _Missing(Exception):
    pass


class AmdSmiSampler:
    name = "amdsmi"

    def __init__(self, module: Any = None, indices: Sequence[int] | None = None):
        self._module = module
        self._indices = list(indices) if indices is not None else None
        self._lock = threading.Lock()
        self._started = False
        self._unavailable: str | None = None
        self._handles: list[Any] = []
        self._static: dict[int, tuple[str, str | None, int | None]] = {}
        self._unsupported: dict[tuple[int, str], bool] = {}

    def _start(self) -> bool:
        with self._lock:
            if self._started:
                return self._unavailable is None
            self._started = True
            try:
                if self._module is None:
                    self._module = importlib.import_module("amdsmi")
            except Exception as e:  # noqa: BLE001 - ImportError, or OSError when libamd_smi.so is absent
                self._unavailable = f"amdsmi does not import ({type(e).__name__}: {e})"
                log.info("AMD SMI unavailable: %s", self._unavailable)
                return False
            try:
                mod = self._module
                flags = getattr(getattr(mod, "AmdSmiInitFlags", None), "INIT_AMD_GPUS", None)
                mod.amdsmi_init(flags) if flags is not None else mod.amdsmi_init()
                self._handles = list(mod.amdsmi_get_processor_handles())
            except Exception as e:  # noqa: BLE001 - AmdSmiException, OSError: no AMD driver here
                self._unavailable = f"AMD SMI does not start ({type(e).__name__}: {e})"
                log.info("AMD SMI unavailable: %s", self._unavailable)
            return self._unavailable is None

    def available(self) -> bool:
        return self._start()

    def close(self) -> None:
        with self._lock:
            if self._started and self._unavailable is None:
                try:
                    self._module.amdsmi_shut_down()
                except Exception as e:  # noqa: BLE001 - shutting down
                    log.debug("amdsmi_shut_down: %s", e)
            self._started = False
            self._unavailable = None
            self._handles = []

    def _read(self, index: int, key: str, missing: list[str], fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` for field ``key``: None (and ``key`` in ``missing``) when AMD SMI cannot say."""
        if self._unsupported.get((index, key)):
            missing.append(key)
            return None
        try:
            value = fn(*args)
        except _Missing:
            missing.append(key)
            return None
        except self._module.AmdSmiException as e:
            log.debug("AMD GPU %d %s: %s", index, key, e)
            self._unsupported[(index, key)] = True
            missing.append(key)
            return None
        if value is None or value == "N/A":
            missing.append(key)
            return None
        return value

    def sample(self) -> Snapshot:
        ts = now()
        if not self._start():
            return Snapshot(timestamp=ts, missing=[f"amdsmi: {self._unavailable}"])
        mod = self._module
        vram = mod.AmdSmiMemoryType.VRAM
        indices = self._indices if self._indices is not None else range(len(self._handles))
        devices: list[DeviceSample] = []
        processes: list[ProcessSample] = []
        missing_all: list[str] = []
        for i in indices:
            if i >= len(self._handles):
                missing_all.append(f"amdsmi: no GPU {i} (AMD SMI sees {len(self._handles)})")
                continue
            h = self._handles[i]
            name, uuid, total = self._identity(i, h)
            missing: list[str] = []
            device = f"rocm:{i}"
            used = self._read(i, "used_bytes", missing, mod.amdsmi_get_gpu_memory_usage, h, vram)
            if total is None:
                missing.append("total_bytes")
            util = self._read(i, "utilization_pct", missing, _activity, mod, h)
            power = self._read(i, "power_w", missing, _power, mod, h)
            temp = self._read(i, "temperature_c", missing, _temperature, mod, h)
            sm = self._read(i, "sm_clock_mhz", missing, _clock, mod, h, mod.AmdSmiClkType.GFX)
            mclk = self._read(i, "mem_clock_mhz", missing, _clock, mod, h, mod.AmdSmiClkType.MEM)
            missing.append("reserved_bytes")
            devices.append(DeviceSample(
                device=device, name=name, source=self.name, uuid=uuid,
                used_bytes=int(used) if used is not None else None, total_bytes=total,
                utilization_pct=float(util) if util is not None else None,
                power_w=float(power) if power is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                sm_clock_mhz=float(sm) if sm is not None else None,
                mem_clock_mhz=float(mclk) if mclk is not None else None,
                missing=missing,
            ))
            plist = self._read(i, "processes", missing, mod.amdsmi_get_gpu_process_list, h)
            for p in plist or []:
                if not isinstance(p, dict) or "pid" not in p:
                    continue
                vram_mem = (p.get("memory_usage") or {}).get("vram_mem", p.get("mem"))
                pname = p.get("name")
                processes.append(ProcessSample(
                    device=device, pid=int(p["pid"]),
                    used_bytes=int(vram_mem) if isinstance(vram_mem, int) else None,
                    name=pname if pname and pname != "N/A" else None,
                ))
        return Snapshot(timestamp=ts, devices=devices, processes=processes, missing=missing_all)

    def _identity(self, index: int, h: Any) -> tuple[str, str | None, int | None]:
        ident = self._static.get(index)
        if ident is None:
            mod = self._module
            missing: list[str] = []
            asic = self._read(index, "name", missing, mod.amdsmi_get_gpu_asic_info, h)
            name = (asic or {}).get("market_name") or f"AMD GPU {index}"
            uuid = self._read(index, "uuid", missing, mod.amdsmi_get_gpu_device_uuid, h)
            total = self._read(index, "total_bytes", missing, mod.amdsmi_get_gpu_memory_total, h,
                               mod.AmdSmiMemoryType.VRAM)
            total = int(total) if total is not None else None
            ident = (str(name), str(uuid) if uuid else None, total)
            self._static[index] = ident
        return ident


def _na(d: Any, key: str) -> Any:
    value = d.get(key) if isinstance(d, dict) else None
    if value is None or value == "N/A":
        raise _Missing(key)
    return value


def _activity(mod: Any, h: Any) -> Any:
    return _na(mod.amdsmi_get_gpu_activity(h), "gfx_activity")


def _clock(mod: Any, h: Any, clk: Any) -> Any:
    return _na(mod.amdsmi_get_clock_info(h, clk), "clk")


def _power(mod: Any, h: Any) -> Any:
    info = mod.amdsmi_get_power_info(h)
    for key in ("current_socket_power", "average_socket_power", "socket_power"):
        value = info.get(key) if isinstance(info, dict) else None
        if value is not None and value != "N/A":
            return value
    raise _Missing("power")


def _temperature(mod: Any, h: Any) -> Any:
    kinds = mod.AmdSmiTemperatureType
    current = mod.AmdSmiTemperatureMetric.CURRENT
    try:
        return mod.amdsmi_get_temp_metric(h, kinds.EDGE, current)
    except mod.AmdSmiException:
        return mod.amdsmi_get_temp_metric(h, kinds.HOTSPOT, current)
