"""Shared pieces for the telemetry tests: NVML backends over the fake module, a counter sampler
whose readings the test knows, and the screenshots folder."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from vramancer.devices.nvml import NvmlBackend
from vramancer.telemetry.samples import DeviceSample, ProcessSample, Snapshot

from . import fake_nvml

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


class ListSampler:
    """Returns the next scripted snapshot's devices / processes on each ``sample()``."""

    def __init__(self, script: list[tuple[list[DeviceSample], list[ProcessSample]]], name: str = "scripted"):
        self.script = list(script)
        self.name = name
        self.calls = 0
        self.closed = False

    def sample(self) -> Snapshot:
        devices, processes = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return Snapshot(timestamp=time.time(), devices=list(devices), processes=list(processes))

    def close(self) -> None:
        self.closed = True


class CounterSampler:
    """One device whose used bytes count the samples: 1, 2, 3, ..."""

    name = "counter"

    def __init__(self, device: str = "sim:0", total: int = 1000):
        self.device = device
        self.total = total
        self.n = 0

    def sample(self) -> Snapshot:
        self.n += 1
        return Snapshot(timestamp=time.time(), devices=[
            DeviceSample(device=self.device, name="counter", source="simulated", used_bytes=self.n,
                         total_bytes=self.total)])

    def close(self) -> None:
        pass


class BrokenSampler:
    name = "broken"

    def sample(self) -> Snapshot:
        raise RuntimeError("sensor on fire")

    def close(self) -> None:
        pass


@pytest.fixture
def fake3() -> fake_nvml.FakeNvml:
    return fake_nvml.three_gpus()


@pytest.fixture
def backend3(fake3) -> NvmlBackend:
    return NvmlBackend(module=fake3)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
