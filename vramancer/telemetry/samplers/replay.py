"""Plays back a recorded trace (CSV or JSON) as if it were live.

``speed=1.0`` keeps the recorded pace: each ``sample()`` returns the recorded snapshot that was
current at ``(elapsed since the first sample) * speed`` into the trace. ``speed=None`` plays as
fast as asked: each ``sample()`` returns the next recorded snapshot. The recorded phase comes
along (the Recorder uses it when no phase of its own is active). At the end the last snapshot
repeats, ``finished`` turns True and each snapshot says so in ``missing``; ``loop=True`` starts over.
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ...errors import TraceFileError
from ..samples import Snapshot
from .base import now

__all__ = ["ReplaySampler"]


class ReplaySampler:
    name = "replay"

    def __init__(self, trace: str | Path | object, speed: float | None = 1.0, loop: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        from ..export import Trace, read_trace

        self._trace = trace if isinstance(trace, Trace) else read_trace(trace)
        self._snapshots = sorted(self._trace.snapshots, key=lambda s: s.timestamp)
        if not self._snapshots:
            raise TraceFileError(f"{self._trace.path or 'trace'}: no samples to replay")
        if speed is not None and not speed > 0:
            raise TraceFileError(f"replay speed must be positive, got {speed}")
        self._offsets = [s.timestamp - self._snapshots[0].timestamp for s in self._snapshots]
        self._speed = speed
        self._loop = loop
        self._clock = clock
        self._started_at: float | None = None
        self._next = 0
        self.finished = False

    @property
    def duration_s(self) -> float:
        return self._offsets[-1]

    def _position(self) -> int:
        if self._speed is None:
            i = self._next
            if i >= len(self._snapshots):
                if not self._loop:
                    self.finished = True
                    return len(self._snapshots) - 1
                i = 0
            self._next = i + 1
            return i
        t = self._clock()
        if self._started_at is None:
            self._started_at = t
        elapsed = (t - self._started_at) * self._speed
        if self._loop and self.duration_s > 0:
            elapsed %= self.duration_s + (self._offsets[1] if len(self._offsets) > 1 else 0.0)
        elif elapsed > self.duration_s:
            self.finished = True
        return max(0, bisect.bisect_right(self._offsets, elapsed) - 1)

    def sample(self) -> Snapshot:
        recorded = self._snapshots[self._position()]
        missing = list(recorded.missing)
        if self.finished:
            missing.append("replay: end of trace")
        return Snapshot(
            timestamp=now(),
            devices=[replace(d, source=self.name, missing=list(d.missing)) for d in recorded.devices],
            processes=[replace(p) for p in recorded.processes],
            phase=recorded.phase,
            missing=missing,
        )

    def close(self) -> None:
        pass
