"""``vramancer --version``: the versions a bug report needs, one per line.

    vramancer 0.1.0
    python 3.11.7
    torch 2.13.0+cpu (built for CUDA none)
    CUDA driver none
    NVIDIA driver none

torch is imported here only (``--version`` is the one place that asks for it); the CUDA driver
API version and the NVIDIA driver come from NVML through ``devices/nvml.py`` ("none" without one).
"""
from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from typing import Any

__all__ = ["VersionInfo", "driver_versions", "version_info", "version_text"]

NONE = "none"


@dataclass(frozen=True)
class VersionInfo:
    vramancer: str
    python: str
    torch: str                 # "none" when torch is not installed
    torch_cuda: str            # the CUDA version torch was built for; "none" for CPU builds
    cuda_driver: str           # the CUDA version the installed driver supports (NVML); "none"
    nvidia_driver: str         # the NVIDIA driver version (NVML); "none"

    def lines(self) -> list[str]:
        torch = self.torch if self.torch == NONE else f"{self.torch} (built for CUDA {self.torch_cuda})"
        return [f"vramancer {self.vramancer}", f"python {self.python}", f"torch {torch}",
                f"CUDA driver {self.cuda_driver}", f"NVIDIA driver {self.nvidia_driver}"]


def _torch_versions() -> tuple[str, str]:
    if importlib.util.find_spec("torch") is None:
        return NONE, NONE
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken torch install is reported, not raised
        return f"unusable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", NONE
    return str(torch.__version__), str(getattr(torch.version, "cuda", None) or NONE)


def driver_versions(backend: Any = None) -> tuple[str, str]:
    """(CUDA version the driver supports, like "12.4"; NVIDIA driver, like "550.54.15"), each
    "none" when NVML or the field is absent. ``backend``: an NvmlBackend (default: the real one)."""
    from .devices.nvml import Absent, NvmlError, default_backend

    backend = backend or default_backend()
    if not backend.available():
        return NONE, NONE
    try:
        driver = backend.call("nvmlSystemGetDriverVersion")
        cuda = backend.call("nvmlSystemGetCudaDriverVersion_v2")
        if isinstance(cuda, Absent):
            cuda = backend.call("nvmlSystemGetCudaDriverVersion")
    except NvmlError:
        return NONE, NONE
    driver_text = NONE if isinstance(driver, Absent) else (
        driver.decode() if isinstance(driver, bytes) else str(driver))
    cuda_text = NONE if isinstance(cuda, Absent) else f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}"
    return cuda_text, driver_text


def version_info() -> VersionInfo:
    from . import __version__

    torch, torch_cuda = _torch_versions()
    cuda, driver = driver_versions()
    return VersionInfo(vramancer=__version__, python=platform.python_version(), torch=torch,
                       torch_cuda=torch_cuda, cuda_driver=cuda, nvidia_driver=driver)


def version_text() -> str:
    return "\n".join(version_info().lines())
