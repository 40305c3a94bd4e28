"""NVIDIA GPUs through NVML: the only module in VRAMancer that calls NVML.

NVML comes from the package ``nvidia-ml-py`` (module ``pynvml``), never from the deprecated
``pynvml`` PyPI package. Every call goes through :func:`nvml_call` / :meth:`NvmlBackend.call`,
which starts NVML lazily (once, thread-safe) and translates NVML's errors:

    NVML_ERROR_NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND,
    ARGUMENT_VERSION_MISMATCH (and pynvml's NVMLLibraryMismatchError)
                                         -> an ``Absent`` result: that field only is missing
    NVML_ERROR_GPU_IS_LOST               -> ``GpuLostError(index)``: the device is marked lost
    NVML_ERROR_LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, no ``pynvml`` module, any failure of nvmlInit
                                         -> NVML unavailable: no devices, not an error
    NVML_ERROR_UNINITIALIZED             -> NVML is started again and the call retried once
    any other NVML error                 -> ``NvmlError`` (one line: function and NVML's message)

Memory is read with ``nvmlDeviceGetMemoryInfo(handle, version=nvmlMemory_v2)`` (driver >= 515:
``used`` excludes the driver-reserved bytes, reported apart) and falls back to the v1 call on
older drivers or older nvidia-ml-py (where v1 ``used`` includes the reserved bytes).

NVML numbers GPUs in PCI bus order (as nvidia-smi does); a GPU is named ``cuda:<NVML index>``
elsewhere in VRAMancer, which matches CUDA's numbering when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and
``CUDA_VISIBLE_DEVICES`` is unset. The UUID is carried everywhere for exact matching.

Tests pass a fake module: ``NvmlBackend(module=fake)``.
"""
from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import VramancerError

__all__ = [
    "Absent",
    "GpuLostError",
    "NvmlError",
    "NvmlBackend",
    "NvmlGpuInfo",
    "MemoryInfo",
    "nvml_call",
    "default_backend",
    "gpus",
    "NOT_SUPPORTED",
    "NO_PERMISSION",
    "FUNCTION_NOT_FOUND",
    "UNAVAILABLE",
]

log = logging.getLogger(__name__)

# Absent.reason values.
NOT_SUPPORTED = "not supported"
NO_PERMISSION = "no permission"
FUNCTION_NOT_FOUND = "function not found"
UNAVAILABLE = "NVML unavailable"

# NVML return codes (nvml.h); read from the module when it has them.
_CODES = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_INVALID_ARGUMENT": 2,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": 25,
}


@dataclass(frozen=True)
class Absent:
    """What a call returns when the driver cannot give that field here. Falsy.

    ``reason`` is one of NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND, UNAVAILABLE."""

    function: str
    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.function}: {self.reason}"


class GpuLostError(VramancerError):
    """NVML_ERROR_GPU_IS_LOST: the GPU fell off the bus or needs a reset."""

    def __init__(self, index: int | None, function: str = ""):
        where = f" in {function}" if function else ""
        super().__init__(f"GPU {index if index is not None else '?'} is lost (NVML_ERROR_GPU_IS_LOST{where}); "
                         "it needs a reset or a reboot")
        self.index = index
        self.function = function


class NvmlError(VramancerError):
    """An NVML failure that is neither 'absent' nor 'lost' (timeouts, unknown errors)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes. ``reserved_bytes`` is None with the v1 call (``version`` 1)."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    reserved_bytes: int | None
    version: int


@dataclass(frozen=True)
class NvmlGpuInfo:
    """One NVIDIA GPU as the inventory sees it."""

    index: int                          # NVML index (PCI bus order)
    name: str
    uuid: str
    pci_bus_id: str | None
    total_bytes: int
    free_bytes: int
    used_bytes: int
    reserved_bytes: int | None          # driver-reserved (v2 memory info); None on old drivers
    pcie_gen: int | None                # max link generation of this GPU in this slot
    pcie_width: int | None              # max link width of this GPU in this slot
    p2p_peers: tuple[str, ...] = ()     # UUIDs this GPU can read from peer-to-peer (P2P read status OK)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class NvmlBackend:
    """NVML, started lazily once; ``module`` is a pynvml-like module (a fake in tests).

    Thread-safe: initialisation and the handle cache are guarded by a lock; NVML itself is
    thread-safe."""

    def __init__(self, module: Any = None):
        self._module = module
        self._lock = threading.RLock()
        self._started = False
        self._unavailable: str | None = None
        self._handles: dict[int, Any] = {}
        self._index_by_handle: dict[int, int] = {}   # id(handle) -> NVML index
        self._memory_v2: bool | None = None           # None: not tried yet

    # -- life cycle -------------------------------------------------------------------------
    @property
    def module(self) -> Any:
        """The pynvml-like module (only after a successful start)."""
        self._ensure_started()
        return self._module

    def _code(self, name: str) -> int:
        return int(getattr(self._module, name, _CODES[name]))

    def _ensure_started(self) -> bool:
        if self._started:
            return self._unavailable is None
        with self._lock:
            if self._started:
                return self._unavailable is None
            self._unavailable = self._start()
            self._started = True
            if self._unavailable:
                log.info("NVML unavailable: %s", self._unavailable)
            return self._unavailable is None

    def _start(self) -> str | None:
        """Import and initialise; returns why NVML is unavailable, or None."""
        if self._module is None:
            try:
                self._module = importlib.import_module("pynvml")
            except ImportError as e:
                return f"nvidia-ml-py is not installed ({e})"
        mod = self._module
        try:
            mod.nvmlInit()
        except mod.NVMLError as e:
            code = getattr(e, "value", None)
            if code == self._code("NVML_ERROR_LIBRARY_NOT_FOUND"):
                return "no NVIDIA driver library (libnvidia-ml) on this machine"
            if code == self._code("NVML_ERROR_DRIVER_NOT_LOADED"):
                return "the NVIDIA driver is not loaded"
            return f"nvmlInit failed: {e}"
        except OSError as e:
            return f"nvmlInit failed: {e}"
        return None

    def available(self) -> bool:
        """True when NVML started; False when there is no library, driver or module."""
        return self._ensure_started()

    @property
    def unavailable_reason(self) -> str | None:
        self._ensure_started()
        return self._unavailable

    def shutdown(self) -> None:
        """Shut NVML down; a later call starts it again."""
        with self._lock:
            if self._started and self._unavailable is None:
                try:
                    self._module.nvmlShutdown()
                except Exception as e:  # noqa: BLE001 - shutting down: nothing to do but log
                    log.debug("nvmlShutdown: %s", e)
            self._started = False
            self._unavailable = None
            self._handles.clear()
            self._index_by_handle.clear()

    # -- calls ------------------------------------------------------------------------------
    def call(self, fn: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call an NVML function by name (or the function itself) with NVML's errors translated
        (see the module docstring). Returns the function's result or an ``Absent``."""
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
        if not self._ensure_started():
            return Absent(name, UNAVAILABLE)
        mod = self._module
        func = getattr(mod, fn, None) if isinstance(fn, str) else fn
        if func is None:
            return Absent(name, FUNCTION_NOT_FOUND)
        mismatch = getattr(mod, "NVMLLibraryMismatchError", None)
        for attempt in (0, 1):
            try:
                return func(*args, **kwargs)
            except mod.NVMLError as e:
                code = getattr(e, "value", None)
                if code == self._code("NVML_ERROR_NOT_SUPPORTED"):
                    return Absent(name, NOT_SUPPORTED)
                if code == self._code("NVML_ERROR_NO_PERMISSION"):
                    return Absent(name, NO_PERMISSION)
                if code in (self._code("NVML_ERROR_FUNCTION_NOT_FOUND"),
                            self._code("NVML_ERROR_ARGUMENT_VERSION_MISMATCH")):
                    return Absent(name, FUNCTION_NOT_FOUND)
                if code == self._code("NVML_ERROR_GPU_IS_LOST"):
                    raise GpuLostError(self._index_of(args), name) from e
                if code == self._code("NVML_ERROR_UNINITIALIZED") and attempt == 0:
                    # Someone shut NVML down under us: start it again and retry once.
                    with self._lock:
                        try:
                            mod.nvmlInit()
                        except mod.NVMLError as e2:
                            raise NvmlError(f"{name}: NVML was shut down and does not start again: {e2}",
                                            getattr(e2, "value", None)) from e2
                    continue
                raise NvmlError(f"{name}: {e}", code) from e
            except Exception as e:
                if mismatch is not None and isinstance(e, mismatch):
                    # pynvml's unversioned wrappers turn FUNCTION_NOT_FOUND into this.
                    return Absent(name, FUNCTION_NOT_FOUND)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _index_of(self, args: tuple) -> int | None:
        for a in args:
            index = self._index_by_handle.get(id(a))
            if index is not None:
                return index
        return None

    def device_count(self) -> int:
        """GPUs NVML sees; 0 when NVML is unavailable."""
        if not self._ensure_started():
            return 0
        count = self.call("nvmlDeviceGetCount")
        return 0 if isinstance(count, Absent) else int(count)

    def handle(self, index: int) -> Any:
        """The NVML handle of GPU ``index`` (cached). Raises GpuLostError, NvmlError; an
        Absent when NVML is unavailable."""
        with self._lock:
            h = self._handles.get(index)
            if h is not None:
                return h
        h = self.call("nvmlDeviceGetHandleByIndex", index)
        if isinstance(h, Absent):
            return h
        with self._lock:
            self._handles[index] = h
            self._index_by_handle[id(h)] = index
        return h

    def memory(self, handle: Any) -> MemoryInfo | Absent:
        """Memory info, v2 when the driver and nvidia-ml-py have it, else v1."""
        mod = self.module
        version = getattr(mod, "nvmlMemory_v2", None)
        if version is not None and self._memory_v2 is not False:
            try:
                info = self.call("nvmlDeviceGetMemoryInfo", handle, version=version)
            except TypeError:   # nvidia-ml-py older than 11.510: no version argument
                info = Absent("nvmlDeviceGetMemoryInfo", FUNCTION_NOT_FOUND)
            except NvmlError as e:
                if e.code != self._code("NVML_ERROR_INVALID_ARGUMENT"):
                    raise
                info = Absent("nvmlDeviceGetMemoryInfo", FUNCTION_NOT_FOUND)
            if not isinstance(info, Absent):
                self._memory_v2 = True
                return MemoryInfo(total_bytes=int(info.total), used_bytes=int(info.used),
                                  free_bytes=int(info.free), reserved_bytes=int(info.reserved), version=2)
            if info.reason != FUNCTION_NOT_FOUND:
                return info
            log.info("NVML memory info v2 unavailable (old driver or nvidia-ml-py); using v1")
            self._memory_v2 = False
        info = self.call("nvmlDeviceGetMemoryInfo", handle)
        if isinstance(info, Absent):
            return info
        return MemoryInfo(total_bytes=int(info.total), used_bytes=int(info.used),
                          free_bytes=int(info.free), reserved_bytes=None, version=1)

    def p2p_read_index(self) -> int:
        # nvidia-ml-py defines NVML_P2P_CAPS_INDEX_READ as the tuple (0,) (a trailing comma).
        value = getattr(self.module, "NVML_P2P_CAPS_INDEX_READ", 0)
        return int(value[0] if isinstance(value, tuple) else value)


_default: NvmlBackend | None = None
_default_lock = threading.Lock()


def default_backend() -> NvmlBackend:
    """The process-wide backend over the real ``pynvml``, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = NvmlBackend()
        return _default


def nvml_call(fn: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an NVML function through the default backend, errors translated
    (``Absent`` / ``GpuLostError`` / ``NvmlError``; an ``Absent`` when NVML is unavailable)."""
    return default_backend().call(fn, *args, **kwargs)


def _optional_int(value: Any) -> int | None:
    return None if isinstance(value, Absent) else int(value)


def gpus(backend: NvmlBackend | None = None) -> list[NvmlGpuInfo]:
    """Every NVIDIA GPU NVML sees, in NVML order; [] when NVML is unavailable.

    A GPU that is lost, or whose memory size the driver does not report, is left out (logged)."""
    b = backend or default_backend()
    if not b.available():
        return []
    found: list[tuple[int, Any, dict]] = []
    for index in range(b.device_count()):
        try:
            h = b.handle(index)
            if isinstance(h, Absent):
                continue
            mem = b.memory(h)
            if isinstance(mem, Absent):
                log.warning("GPU %d left out: NVML memory info %s", index, mem.reason)
                continue
            name = b.call("nvmlDeviceGetName", h)
            uuid = b.call("nvmlDeviceGetUUID", h)
            pci = b.call("nvmlDeviceGetPciInfo", h)
            gen = b.call("nvmlDeviceGetMaxPcieLinkGeneration", h)
            if isinstance(gen, Absent):
                gen = b.call("nvmlDeviceGetCurrPcieLinkGeneration", h)
            width = b.call("nvmlDeviceGetMaxPcieLinkWidth", h)
            if isinstance(width, Absent):
                width = b.call("nvmlDeviceGetCurrPcieLinkWidth", h)
        except GpuLostError as e:
            log.warning("GPU %d left out: %s", index, e)
            continue
        except NvmlError as e:
            log.warning("GPU %d left out: %s", index, e)
            continue
        found.append((index, h, dict(
            index=index,
            name=_text(name) if not isinstance(name, Absent) else f"NVIDIA GPU {index}",
            uuid=_text(uuid) if not isinstance(uuid, Absent) else f"nvml-index-{index}",
            pci_bus_id=_text(pci.busId) if not isinstance(pci, Absent) else None,
            total_bytes=mem.total_bytes, free_bytes=mem.free_bytes, used_bytes=mem.used_bytes,
            reserved_bytes=mem.reserved_bytes,
            pcie_gen=_optional_int(gen), pcie_width=_optional_int(width),
        )))
    read_index = b.p2p_read_index()
    ok = int(getattr(b.module, "NVML_P2P_STATUS_OK", 0))
    out = []
    for index, h, fields in found:
        peers = []
        for other_index, other_h, other in found:
            if other_index == index:
                continue
            try:
                status = b.call("nvmlDeviceGetP2PStatus", h, other_h, read_index)
            except (GpuLostError, NvmlError) as e:
                log.debug("P2P status %d -> %d unknown: %s", index, other_index, e)
                continue
            if not isinstance(status, Absent) and int(status) == ok:
                peers.append(other["uuid"])
        out.append(NvmlGpuInfo(p2p_peers=tuple(peers), **fields))
    return out
