"""The one interface every sampler keeps: ``name``, ``sample() -> Snapshot``, ``close()``."""
from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from ..samples import Snapshot

__all__ = ["Sampler", "now"]


@runtime_checkable
class Sampler(Protocol):
    """A source of samples. ``sample()`` returns the devices (and processes) it sees now, with
    ``phase`` left None (only a replay gives the phase it recorded); what it could not read goes
    in ``DeviceSample.missing`` / ``Snapshot.missing``. A sampler may raise: the Recorder logs
    the error into that tick's ``Snapshot.missing`` and goes on."""

    name: str

    def sample(self) -> Snapshot: ...

    def close(self) -> None: ...


def now() -> float:
    return time.time()
