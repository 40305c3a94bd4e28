"""Shared pieces for the live-view tests: a scripted sampler whose next reading the test sets,
a Recorder over it (not started: tests call ``sample_once`` so every value is known), and the
folder screenshots go to."""
from __future__ import annotations

from pathlib import Path

import pytest

from vramancer.telemetry.recorder import Recorder

from .scripted import ScriptedSampler

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


@pytest.fixture
def sampler() -> ScriptedSampler:
    return ScriptedSampler()


@pytest.fixture
def recorder(sampler: ScriptedSampler):
    rec = Recorder(samplers=[sampler], interval=0.05)
    yield rec
    rec.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
