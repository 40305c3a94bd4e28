"""Benchmark scripts are not a package: each smoke test imports its script by path. A benchmark may
set torch's thread count (``--threads``); every smoke test here gives the process its count back,
since the planner's host figures depend on it (devices/host_speed.py) and the next test in the
same worker must plan as on a fresh process."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def import_script(name: str, module_name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py imported as ``module_name`` (for a fixture: ``yield from``), removed
    from sys.modules afterwards."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(module_name, None)


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
