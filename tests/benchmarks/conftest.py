"""Benchmark scripts are not a package: each smoke test imports its script by path."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

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
