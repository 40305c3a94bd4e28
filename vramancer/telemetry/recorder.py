"""The Recorder: samples every sampler at a set interval on a background thread, keeps the
snapshots in a bounded ring buffer, knows the named phases of a run, and computes the peaks.

    with vramancer.track(interval=0.1) as rec:       # starts sampling
        with rec.phase("load"):
            model = load(...)
        with rec.phase("generate"):
            with rec.phase("prefill"): ...
            rec.mark("first token")
    print(rec.peaks().to_dict()); rec.to_csv("trace.csv")

One tick asks each sampler once and merges what they return into one Snapshot stamped with the
tick's time and the innermost active phase. A sampler that raises costs only its own samples:
the error goes into that snapshot's ``missing`` and the thread goes on. Exports and live views
read the Recorder (``snapshots()``, ``latest()``, ``subscribe()``), never the samplers.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, overload

from ..errors import WorkloadError
from .peaks import Mark, PeakReport, PeakTracker, PhaseInterval
from .samples import Snapshot

__all__ = ["Recorder", "Subscription", "track", "MIN_INTERVAL_S", "MAX_INTERVAL_S", "DEFAULT_CAPACITY"]

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 3600.0
DEFAULT_CAPACITY = 36000     # 10 hours at 1 s


class _WallClock:
    """time.time() at start, advanced by time.monotonic(): wall-clock stamps that never go back."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def __call__(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)


class Subscription:
    """A thread-safe queue of the snapshots a Recorder takes after ``subscribe()``.

    ``get(timeout)`` works like ``queue.Queue.get``: it raises ``queue.Empty`` when nothing came
    within ``timeout`` (``timeout=0``: do not wait), and returns None once the subscription is
    closed. When the consumer falls behind by ``maxsize`` snapshots the oldest are dropped
    (counted in ``dropped``): a live view wants the newest."""

    def __init__(self, recorder: Recorder, maxsize: int = 1024):
        self._recorder = recorder
        self._queue: queue.Queue[Snapshot | None] = queue.Queue(maxsize=max(1, int(maxsize)))
        self._lock = threading.Lock()
        self.dropped = 0
        self.closed = False

    def _put(self, snap: Snapshot) -> None:
        with self._lock:
            if self.closed:
                return
            while True:
                try:
                    self._queue.put_nowait(snap)
                    return
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass

    def get(self, timeout: float | None = None) -> Snapshot | None:
        if self.closed and self._queue.empty():
            return None
        return self._queue.get(timeout=timeout)

    def get_nowait(self) -> Snapshot | None:
        return self.get(timeout=0)

    def drain(self) -> list[Snapshot]:
        """Everything queued now, without waiting."""
        out = []
        while True:
            try:
                snap = self._queue.get_nowait()
            except queue.Empty:
                return out
            if snap is not None:
                out.append(snap)

    def __iter__(self) -> Iterator[Snapshot]:
        """Blocks for each next snapshot; ends when the subscription is closed."""
        while True:
            snap = self.get()
            if snap is None:
                return
            yield snap

    def close(self) -> None:
        """Stop receiving; wakes a consumer blocked in ``get``."""
        self._recorder.unsubscribe(self)

    def _closed_by_recorder(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._queue.put_nowait(None)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_interval(interval: Any) -> float:
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise WorkloadError(f"interval must be a number of seconds, got {interval!r}")
    interval = float(interval)
    if math.isnan(interval) or not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
        raise WorkloadError(f"interval must be between {MIN_INTERVAL_S:g} s and {MAX_INTERVAL_S:g} s, "
                            f"got {interval:g}")
    return interval


class Recorder:
    """Samples ``samplers`` (``default_samplers()`` when None) every ``interval`` seconds
    (0.05 .. 3600) into a ring buffer of ``capacity`` snapshots (the newest are kept)."""

    def __init__(self, samplers: list | None = None, interval: float = 1.0, capacity: int = DEFAULT_CAPACITY):
        self.interval = _check_interval(interval)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise WorkloadError(f"capacity must be a positive number of snapshots, got {capacity!r}")
        self.capacity = capacity
        if samplers is None:
            from .samplers import default_samplers

            samplers = default_samplers()
            self._owns_samplers = True
        else:
            self._owns_samplers = False
        self.samplers = list(samplers)
        self._clock = _WallClock()
        self._buffer: deque[Snapshot] = deque(maxlen=capacity)
        self._lock = threading.Lock()            # buffer, phases, marks, subscribers, tracker
        self._sample_lock = threading.Lock()     # one tick at a time: samplers need not be thread-safe
        self._active: list[tuple[object, str]] = []   # open phases, outermost first
        self._phases: list[PhaseInterval] = []
        self._marks: list[Mark] = []
        self._subscribers: list[Subscription] = []
        self._tracker = PeakTracker()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ticks = 0
        self.sampler_errors = 0

    # -- life cycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Recorder:
        """Start the background thread (no-op when it runs)."""
        with self._lock:
            if self.running:
                return self
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="vramancer-recorder", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread and wait for it (at most ``timeout`` s)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("recorder thread still busy in a sampler after %.0f s; left running as daemon", timeout)
        self._thread = None

    def close(self) -> None:
        """Stop, close the subscriptions, and close the samplers this Recorder made itself."""
        self.stop()
        with self._lock:
            subs, self._subscribers = self._subscribers, []
        for sub in subs:
            sub._closed_by_recorder()
        if self._owns_samplers:
            for s in self.samplers:
                try:
                    s.close()
                except Exception as e:  # noqa: BLE001 - closing: log and go on
                    log.debug("closing sampler %s: %s", getattr(s, "name", s), e)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        try:
            self.sample_once()      # one last sample: the state at the end of the block
        finally:
            self.close()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while True:                  # the first sample is taken even when stop() came already
            try:
                self.sample_once()
            except Exception:  # noqa: BLE001 - the thread must outlive any bug in a tick
                log.exception("recorder tick failed")
            next_tick += self.interval
            delay = next_tick - time.monotonic()
            if delay < 0:            # fell behind (slow sampler): skip the missed ticks
                next_tick = time.monotonic()
                delay = 0.0
            if self._stop.wait(delay):
                return

    # -- sampling ---------------------------------------------------------------------------
    def now(self) -> float:
        """The Recorder's clock (wall-clock seconds, never going back)."""
        return self._clock()

    def sample_once(self) -> Snapshot:
        """Take one snapshot now (synchronously), store it, tell the subscribers, return it."""
        with self._sample_lock:
            ts = self._clock()
            with self._lock:
                active = [name for _, name in self._active]
            devices, processes, missing = [], [], []
            sampler_phase = None
            for s in self.samplers:
                try:
                    snap = s.sample()
                except Exception as e:  # noqa: BLE001 - one sampler's failure costs only its samples
                    self.sampler_errors += 1
                    log.debug("sampler %s failed", getattr(s, "name", s), exc_info=True)
                    missing.append(f"{getattr(s, 'name', type(s).__name__)}: {type(e).__name__}: {e}")
                    continue
                devices.extend(snap.devices)
                processes.extend(snap.processes)
                missing.extend(snap.missing)
                sampler_phase = sampler_phase or snap.phase
            phase = active[-1] if active else sampler_phase
            snapshot = Snapshot(timestamp=ts, devices=devices, processes=processes, phase=phase, missing=missing)
            with self._lock:
                self._buffer.append(snapshot)
                self._tracker.add(snapshot, active if active else ([phase] if phase else []))
                self.ticks += 1
                subscribers = list(self._subscribers)
            for sub in subscribers:
                sub._put(snapshot)
            return snapshot

    # -- phases -----------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[Recorder]:
        """Mark a named phase of the run; phases nest, and a sample belongs to the innermost."""
        if not isinstance(name, str) or not name.strip():
            raise WorkloadError(f"a phase needs a non-empty name, got {name!r}")
        token = object()
        with self._lock:
            start = self._clock()
            depth = len(self._active)
            self._active.append((token, name))
            index = len(self._phases)
            self._phases.append(PhaseInterval(name=name, start=start, end=None, depth=depth))
        try:
            yield self
        finally:
            with self._lock:
                self._active = [(t, n) for t, n in self._active if t is not token]
                self._phases[index] = replace(self._phases[index], end=self._clock())

    def current_phase(self) -> str | None:
        with self._lock:
            return self._active[-1][1] if self._active else None

    def mark(self, name: str) -> Mark:
        """Record an instantaneous event."""
        if not isinstance(name, str) or not name.strip():
            raise WorkloadError(f"a mark needs a non-empty name, got {name!r}")
        with self._lock:
            m = Mark(name=name, timestamp=self._clock())
            self._marks.append(m)
        return m

    def phases(self) -> list[PhaseInterval]:
        """Every phase so far, in the order they started (open ones have ``end`` None)."""
        with self._lock:
            return list(self._phases)

    def marks(self) -> list[Mark]:
        with self._lock:
            return list(self._marks)

    # -- reading ----------------------------------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        """A copy of the ring buffer, oldest first."""
        with self._lock:
            return list(self._buffer)

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._buffer[-1] if self._buffer else None

    def devices(self) -> list[str]:
        """Device ids seen so far, in the order they first appeared."""
        with self._lock:
            return self._tracker.devices()

    def peaks(self) -> PeakReport:
        """Peaks over every sample since the start (including those the ring buffer dropped)."""
        with self._lock:
            return self._tracker.report(list(self._phases))

    def device_peak_bytes(self, device: str) -> int | None:
        with self._lock:
            return self._tracker.device_peak_bytes(device)

    def reset_peaks(self) -> None:
        """Forget the peaks so far (the ring buffer and phases stay)."""
        with self._lock:
            self._tracker = PeakTracker()

    def subscribe(self, maxsize: int = 1024) -> Subscription:
        """A queue that receives every snapshot taken from now on."""
        sub = Subscription(self, maxsize)
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not sub]
        sub._closed_by_recorder()

    # -- export -----------------------------------------------------------------------------
    @overload
    def to_csv(self, path: None = None) -> str: ...
    @overload
    def to_csv(self, path: str | Path) -> Path: ...

    def to_csv(self, path: str | Path | None = None) -> str | Path:
        """The trace as CSV (columns in telemetry/export.py): written atomically to ``path`` (the
        path is returned), or returned as text without one (like ``Plan.to_json()`` and pandas)."""
        from .export import csv_text, write_csv

        return csv_text(self.snapshots()) if path is None else write_csv(path, self.snapshots())

    @overload
    def to_json(self, path: None = None) -> str: ...
    @overload
    def to_json(self, path: str | Path) -> Path: ...

    def to_json(self, path: str | Path | None = None) -> str | Path:
        """The trace as schema-1 JSON, phases and marks included: written atomically to ``path``
        (the path is returned), or returned as text without one."""
        from .export import json_text, write_json

        args = dict(phases=self.phases(), marks=self.marks(), interval=self.interval)
        return json_text(self.snapshots(), **args) if path is None else write_json(path, self.snapshots(), **args)


def track(interval: float = 1.0, samplers: list | None = None, **kwargs: Any) -> Recorder:
    """A started Recorder (``vramancer.track``); use it as a context manager to stop it."""
    return Recorder(samplers=samplers, interval=interval, **kwargs).start()
