"""Progress of a load: bytes and tensors placed per stage, drawn on stderr while it happens.

    with LoadProgress(plan) as progress:            # bars only when stderr is a terminal
        model = load(folder, plan=plan, progress=progress)
    progress.seconds, progress.placed_bytes          # for the run's final stats

The loader calls ``placed(stage, nbytes)`` once per tensor it puts on a stage (a tensor that
streams from the disk tier counts when it is mapped or written to the offload file). Bars are
rich's, one per stage, sized by the plan's weights for that stage; in a pipe, a log or with
``--quiet`` nothing is drawn and only the counts and the time are kept.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.plan import Plan

__all__ = ["LoadProgress"]


class LoadProgress:
    """Counts per stage (``bytes[i]``, ``tensors[i]``) and the load's wall time (``seconds``).
    ``enabled``: draw bars (default: when ``stream`` is a terminal)."""

    def __init__(self, plan: Plan, enabled: bool | None = None, stream: TextIO | None = None):
        self.plan = plan
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else bool(enabled)
        self.bytes = [0] * len(plan.stages)
        self.tensors = [0] * len(plan.stages)
        self.seconds: float | None = None
        self._t0: float | None = None
        self._bars: Any = None
        self._tasks: list[Any] = []

    @property
    def placed_bytes(self) -> int:
        return sum(self.bytes)

    @property
    def placed_tensors(self) -> int:
        return sum(self.tensors)

    def __enter__(self) -> LoadProgress:
        self._t0 = time.perf_counter()
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                  TextColumn("{task.fields[tensors]} tensors"), TimeElapsedColumn(),
                                  console=Console(file=self.stream), transient=False)
            for i, st in enumerate(self.plan.stages):
                where = st.device if st.mode != "stream" else f"{st.device} -> {st.compute_device}"
                self._tasks.append(self._bars.add_task(
                    f"load s{i} {where} blocks {st.blocks[0]}-{st.blocks[1] - 1}",
                    total=max(st.weights_bytes, 1), tensors=0))
            self._bars.start()
        return self

    def placed(self, stage: int, nbytes: int) -> None:
        """One tensor of ``nbytes`` is on (or mapped for) stage ``stage``."""
        self.bytes[stage] += int(nbytes)
        self.tensors[stage] += 1
        if self._bars is not None:
            self._bars.update(self._tasks[stage], advance=int(nbytes), tensors=self.tensors[stage])

    def __exit__(self, *exc: Any) -> None:
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
        if self._bars is not None:
            if exc[0] is None:   # a finished load fills its bars (buffers and ties make weights inexact)
                for task, st in zip(self._tasks, self.plan.stages):
                    self._bars.update(task, completed=max(st.weights_bytes, 1))
            self._bars.stop()
            self._bars = None

    def summary(self) -> str:
        """"loaded 1.2 GiB (291 tensors) in 3.4 s" for the run's final stats."""
        from ..units import format_bytes

        took = f" in {self.seconds:.2f} s" if self.seconds is not None else ""
        return f"loaded {format_bytes(self.placed_bytes)} ({self.placed_tensors} tensors){took}"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
