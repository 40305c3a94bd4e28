"""Peak memory per device and phase of the last ComfyUI run, for the "VRAM report" node.

Phases: ``encode`` (a text encoder the CLIP-to-device node placed), ``denoise`` (a split MODEL's
denoiser calls), ``decode`` / ``vae encode`` (a VAE the VAE-to-device node placed). A phase entered
after a later one (encode after denoise or decode) starts a new run; the report shows the run last
recorded. Per device and phase:

- a CUDA device: the torch allocator's peak (``max_memory_allocated``, its counter reset when the
  phase is entered), the largest over the phase's entries;
- the CPU: this process's resident memory (RSS) when the phase is left (psutil), the largest;
- each planned device of a split (simulated GPUs included): the bytes of denoiser weights its stages
  hold, measured from the parameters and buffers, next to the plan's weights + workspace.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["PhasePeak", "PhaseTracker", "TRACKER", "PHASE_ORDER"]

PHASE_ORDER = {"encode": 0, "vae encode": 0, "denoise": 1, "decode": 2}


@dataclass
class PhasePeak:
    phase: str
    device: str
    bytes: int
    source: str                 # "allocator peak" | "process RSS" | "weights held"
    planned_bytes: int | None = None
    entries: int = 1


@dataclass
class _Run:
    number: int
    peaks: dict[tuple[str, str, str], PhasePeak] = field(default_factory=dict)
    last_order: int = -1
    splits: dict[int, str] = field(default_factory=dict)    # id(SplitState) -> its counters line


class PhaseTracker:
    """Records the peaks of the phases the nodes' hooks report (``with TRACKER.phase(...)``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: list[_Run] = []
        self._depth = 0

    def _run_for(self, phase: str) -> _Run:
        order = PHASE_ORDER.get(phase, 1)
        if not self.runs or order < self.runs[-1].last_order:   # a new run: the last one is kept
            number = self.runs[-1].number + 1 if self.runs else 1
            self.runs = [_Run(number)]
        run = self.runs[-1]
        run.last_order = max(run.last_order, order)
        return run

    def _note(self, run: _Run, phase: str, device: str, nbytes: int, source: str,
              planned: int | None = None) -> None:
        key = (phase, device, source)
        cur = run.peaks.get(key)
        if cur is None:
            run.peaks[key] = PhasePeak(phase, device, int(nbytes), source, planned)
        else:
            cur.bytes = max(cur.bytes, int(nbytes))
            cur.entries += 1

    @contextmanager
    def phase(self, name: str, devices: list[torch.device], held: Callable[[], dict[str, int]] | None = None,
              planned: dict[str, tuple[int, int]] | None = None) -> Iterator[None]:
        """Record ``name`` on ``devices`` (torch devices) while the body runs; ``held()`` gives bytes per
        planned device id at the end, ``planned`` the plan's (weights, workspace) per device id."""
        import torch

        cuda = [d for d in devices if d.type == "cuda"]
        with self._lock:
            outer = self._depth == 0
            self._depth += 1
            run = self._run_for(name)
        if outer:
            for d in cuda:
                torch.cuda.reset_peak_memory_stats(d)
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if outer:
                    for d in cuda:
                        self._note(run, name, str(d), torch.cuda.max_memory_allocated(d), "allocator peak")
                    if any(d.type == "cpu" for d in devices):
                        import psutil

                        self._note(run, name, "cpu", psutil.Process().memory_info().rss, "process RSS")
                    if held is not None:
                        for dev, n in held().items():
                            p = (planned or {}).get(dev)
                            self._note(run, name, dev, n, "weights held", None if p is None else p[0] + p[1])

    def note_split(self, key: int, line: str) -> None:
        """A split model's counters (placements, calls) as of its last call in the current run."""
        with self._lock:
            if self.runs:
                self.runs[-1].splits[key] = line

    def last_run(self) -> list[PhasePeak]:
        with self._lock:
            if not self.runs:
                return []
            peaks = list(self.runs[-1].peaks.values())
        return sorted(peaks, key=lambda p: (PHASE_ORDER.get(p.phase, 1), p.phase, p.device, p.source))

    def report(self) -> str:
        peaks = self.last_run()
        if not peaks:
            return ("VRAMancer report: nothing recorded yet (the report covers models passed through the Split, "
                    "CLIP to device and VAE to device nodes)")
        lines = [f"VRAMancer report, run {self.runs[-1].number}: peak per device and phase"]
        for p in peaks:
            extra = ""
            if p.planned_bytes is not None:
                extra = f" (plan: {format_bytes(p.planned_bytes)} weights + workspace)"
            lines.append(f"{p.phase:<10} {p.device:<14} {format_bytes(p.bytes):>10}  {p.source}{extra}"
                         f"  [{p.entries} call{'s' if p.entries != 1 else ''}]")
        with self._lock:
            lines.extend(self.runs[-1].splits.values() if self.runs else ())
        return "\n".join(lines)

    def clear(self) -> None:
        with self._lock:
            self.runs = []


TRACKER = PhaseTracker()


def track_module(module: Any, phase_of_child: Callable[[str], str | None], device_of: Callable[[], Any]) -> None:
    """Forward hooks on ``module``'s direct children (once per module) that record the phase
    ``phase_of_child(child name)`` (None: not recorded) on ``device_of()`` while a child runs."""
    if getattr(module, "_vramancer_tracked", False):
        return
    for name, child in module.named_children():
        phase = phase_of_child(name)
        if phase is None:
            continue
        state: dict[str, Any] = {}

        def pre(mod: Any, args: Any, phase: str = phase, state: dict = state) -> None:
            cm = TRACKER.phase(phase, [device_of()])
            cm.__enter__()
            state.setdefault("open", []).append(cm)

        def post(mod: Any, args: Any, out: Any, state: dict = state) -> None:
            opened = state.get("open")
            if opened:
                opened.pop().__exit__(None, None, None)

        child.register_forward_pre_hook(pre)
        child.register_forward_hook(post, always_call=True)
    module._vramancer_tracked = True
