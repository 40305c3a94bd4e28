"""`vramancer run --monitor`: memory per stage while a split model loads and generates.

A Recorder samples the plan's simulated devices (the runtime's accounting, ``StageFeed``) and its
real ones (NVML, torch, host RAM) in the phases ``load``, ``prefill`` (to the logits of the first
new token) and ``decode``, with one sample taken at the end of each phase so that even a run
shorter than the interval has each phase's memory. The live view is one line per phase change
and per second on stderr when stdout or stderr is not a terminal (logs, pipes), else a compact
panel of per-stage bars on the terminal (the generated text is printed when the panel closes).
At the end: the peak analysis and, with ``--trace FILE``, the trace (CSV or JSON by suffix)
that ``vramancer report`` reads.
"""
from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import BadInputError, WorkloadError
from ..units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.plan import Plan
    from ..telemetry.peaks import PeakReport
    from ..telemetry.recorder import Recorder
    from ..telemetry.samples import Snapshot
    from .split import SplitRuntime
    from .telemetry_feed import StageFeed

__all__ = ["RunMonitor", "GenerationPhases", "stage_line", "throttle_lines", "check_trace_path",
           "check_monitor_interval", "DEFAULT_MONITOR_INTERVAL_S", "TEXT_TAIL_CHARS"]

log = logging.getLogger(__name__)

DEFAULT_MONITOR_INTERVAL_S = 0.1
TEXT_TAIL_CHARS = 240          # generated text the panel shows under the bars


def check_trace_path(path: str | Path) -> Path:
    """``path`` for ``--trace``: a .csv or .json file in a folder that exists."""
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".json"):
        raise BadInputError(f"--trace {str(p)!r}: the file name must end in .csv or .json")
    from .._io import check_writable

    check_writable(p, "--trace")      # a folder, a missing or read-only folder: before the run
    return p


def check_monitor_interval(seconds: float) -> float:
    from ..telemetry.recorder import MAX_INTERVAL_S, MIN_INTERVAL_S

    if not (MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S):    # also refuses NaN
        raise WorkloadError(f"--monitor-interval must be between {MIN_INTERVAL_S:g} and {MAX_INTERVAL_S:g} s, "
                            f"got {seconds:g}")
    return float(seconds)


LINE_EVERY_S = 1.0   # the live view's line rate within a phase (it samples faster)


def _size(n: int | None) -> str:
    return "n/a" if n is None else format_bytes(n, 1)


def stage_line(snapshot: Snapshot, labels: dict[str, str] | None = None) -> str:
    """One log line per sample: "14:03:07.250 decode | s0 rtx3060-12gb#0 1.3 MiB / 12.0 GiB | cpu ..."."""
    from ..units import iso_time

    labels = labels or {}
    parts = []
    for d in snapshot.devices:
        name = f"{labels[d.device]} {d.device}" if d.device in labels else d.device
        parts.append(f"{name} LOST" if d.lost else f"{name} {_size(d.used_bytes)} / {_size(d.total_bytes)}")
    return (f"{iso_time(snapshot.timestamp)[11:]} {snapshot.phase or '-'} | "
            + (" | ".join(parts) if parts else "no devices"))


def throttle_lines(snapshots: Iterable[Snapshot], every_s: float = LINE_EVERY_S) -> Iterator[Snapshot]:
    """The samples the line view prints: the first of each phase (after the last one of the phase
    before), at most one per ``every_s`` seconds within a phase, and the very last sample."""
    last_phase: Any = ()                     # nothing printed yet
    last_t = float("-inf")
    held = None                              # the newest sample not printed
    for snap in snapshots:
        if snap.phase != last_phase:
            if held is not None:
                yield held
        elif snap.timestamp - last_t < every_s:
            held = snap
            continue
        held = None
        last_phase, last_t = snap.phase, snap.timestamp
        yield snap
    if held is not None:
        yield held


class GenerationPhases:
    """``prefill`` from entering until the logits of the first new token exist, ``decode`` from
    there to the end, a "first token" mark between them. A sample closes each phase: prefill's
    at its first logits (weights + the prompt's KV cache), decode's at its last step, while the
    generation still holds its whole KV cache (``max_new_tokens`` reached or an end token)::

        with GenerationPhases(rec, max_new_tokens=64, eos_token_ids=[2]) as phases:
            generate_text(model, tok, prompt, max_new_tokens=64, **phases.generate_kwargs())
    """

    def __init__(self, recorder: Recorder, max_new_tokens: int | None = None,
                 eos_token_ids: Any = None):
        self.recorder = recorder
        self.max_new_tokens = max_new_tokens
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = {int(t) for t in eos_token_ids}
        self._open: Any = None
        self.first_token_seen = False
        self.steps = 0
        self.last_step_sampled = False

    def _enter(self, name: str) -> None:
        self._open = self.recorder.phase(name)
        self._open.__enter__()

    def _leave(self) -> None:
        cm, self._open = self._open, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def __enter__(self) -> GenerationPhases:
        self._enter("prefill")
        return self

    def first_token(self) -> None:
        """Prefill is over: the first new token's logits are here. Acts once per generation."""
        if self.first_token_seen:
            return
        self.first_token_seen = True
        self.recorder.sample_once()
        self._leave()
        self.recorder.mark("first token")
        self._enter("decode")

    def step(self, last_tokens: list[int]) -> None:
        """A new token per sequence was chosen; at the last step, take decode's closing sample."""
        self.steps += 1
        last = ((self.max_new_tokens is not None and self.steps >= self.max_new_tokens)
                or (bool(last_tokens) and all(t in self.eos_token_ids for t in last_tokens)))
        if last and not self.last_step_sampled:
            self.last_step_sampled = True
            self.recorder.sample_once()

    def generate_kwargs(self) -> dict:
        """``logits_processor`` and ``stopping_criteria`` for ``generate`` that call
        ``first_token`` and ``step``; they change neither the scores nor when generation stops."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        phases = self

        class FirstTokenProcessor(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                phases.first_token()
                return scores

        class StepWatch(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                phases.step(input_ids[:, -1].tolist())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return {"logits_processor": LogitsProcessorList([FirstTokenProcessor()]),
                "stopping_criteria": StoppingCriteriaList([StepWatch()])}

    def __exit__(self, *exc: Any) -> None:
        try:
            if not self.last_step_sampled:   # a failed prefill, or an end the steps did not see
                self.recorder.sample_once()
        finally:
            self._leave()


class RunMonitor:
    """Records one split run: start(), then ``loading(model)``, ``attach(runtime)``,
    ``generating()``, and finish() (idempotent; also after an error). ``live``: show samples as
    they come (``panel`` says which view); ``trace``: where finish() writes the trace."""

    def __init__(self, plan: Plan, interval_s: float = DEFAULT_MONITOR_INTERVAL_S, live: bool = True,
                 trace: str | Path | None = None, stream: TextIO | None = None, panel: bool | None = None,
                 real_devices: bool = True):
        from ..telemetry.recorder import Recorder
        from .telemetry_feed import StageFeed

        self.plan = plan
        self.trace = check_trace_path(trace) if trace is not None else None
        self.feed: StageFeed = StageFeed(plan)
        self.samplers = self.feed.samplers(real=real_devices)
        self.recorder: Recorder = Recorder(self.samplers, interval=check_monitor_interval(interval_s))
        self.live = live
        self.stream = stream if stream is not None else sys.stderr
        if panel is None:
            panel = live and _is_tty(sys.stdout) and _is_tty(self.stream)
        self.panel = bool(panel and live)
        self.labels = self.feed.stage_labels()
        self.text = ""
        self.written: Path | None = None
        self._live_view: Any = None
        self._printer: threading.Thread | None = None
        self._finished = False

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> RunMonitor:
        if self.live and not self.panel:
            sub = self.recorder.subscribe()
            self._printer = threading.Thread(target=self._print_lines, args=(sub,), name="vramancer-run-monitor",
                                             daemon=True)
            self._printer.start()
        self.recorder.start()
        if self.panel:
            from rich.console import Console
            from rich.live import Live

            rate = max(1.0, min(10.0, 1.0 / self.recorder.interval))
            self._live_view = Live(get_renderable=self._render_panel, console=Console(file=self.stream),
                                   refresh_per_second=rate, transient=True)
            self._live_view.start()
        return self

    def __enter__(self) -> RunMonitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    @contextmanager
    def loading(self, model: Any) -> Iterator[RunMonitor]:
        """The ``load`` phase around loading ``model`` (what is passed to ``load``)."""
        with self.recorder.phase("load"), self.feed.watch_load(model):
            yield self
            self.recorder.sample_once()      # the loaded state, inside the load phase

    def attach(self, runtime: SplitRuntime) -> None:
        self.feed.attach(runtime)

    def generating(self, max_new_tokens: int | None = None, eos_token_ids: Any = None) -> GenerationPhases:
        return GenerationPhases(self.recorder, max_new_tokens, eos_token_ids)

    def emit(self, piece: str) -> None:
        """Generated text for the panel (the caller prints it after finish())."""
        self.text += piece

    def finish(self, quiet: bool = False) -> PeakReport:
        """Stop sampling (one last sample), stop the live view, write the trace; the peaks.
        ``quiet``: an error is already on its way (a failed run): failing to write the trace is
        logged, not raised, so that it does not hide that error."""
        if not self._finished:
            self._finished = True
            rec = self.recorder
            try:
                rec.stop()
                rec.sample_once()
            finally:
                rec.close()                  # ends the subscriptions: the line printer returns
                if self._printer is not None:
                    self._printer.join(timeout=10)
                if self._live_view is not None:
                    self._live_view.stop()
                self.feed.detach()
                for s in self.samplers:
                    try:
                        s.close()
                    except Exception as e:  # noqa: BLE001 - closing a sampler must not hide the run's result
                        log.debug("closing sampler %s: %s", getattr(s, "name", s), e)
            if self.trace is not None:
                try:
                    if self.trace.suffix.lower() == ".csv":
                        rec.to_csv(self.trace)
                    else:
                        rec.to_json(self.trace)
                    self.written = self.trace
                except Exception as e:  # noqa: BLE001 - see ``quiet``
                    if not quiet:
                        raise
                    log.warning("trace not written to %s: %s", self.trace, e)
        return self.recorder.peaks()

    # -- views ------------------------------------------------------------------------------------
    def _print_lines(self, sub: Any) -> None:
        for snap in throttle_lines(sub):
            try:
                self.stream.write(stage_line(snap, self.labels) + "\n")
                self.stream.flush()
            except (OSError, ValueError):    # the stream closed under us (a pipe's reader left)
                return

    def _render_panel(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        snap = self.recorder.latest()
        grid = Table.grid(padding=(0, 1))
        if snap is None:
            grid.add_row("no sample yet")
        else:
            for d in snap.devices:
                used, total = d.used_bytes, d.total_bytes
                bar: Any = (ProgressBar(total=float(total), completed=float(min(used, total)), width=28)
                            if used is not None and total else Text("-"))
                grid.add_row(Text(self.labels.get(d.device, ""), style="bold"), Text(d.device), bar,
                             Text(f"{_size(used)} / {_size(total)}" if not d.lost else "LOST"))
        phase = self.recorder.current_phase() or "-"
        parts: list[Any] = [grid]
        if self.text:
            parts.append(Text(self.text[-TEXT_TAIL_CHARS:].replace("\n", " "), style="dim", overflow="fold"))
        return Panel(Group(*parts), title=f"VRAM per stage · {phase}", title_align="left", expand=False)

    # -- results ----------------------------------------------------------------------------------
    def summary(self) -> dict:
        """For ``--json``: the phases, marks, peaks and where the trace went."""
        rec = self.recorder
        return {"interval_s": rec.interval, "trace": str(self.written) if self.written else None,
                "samples": rec.ticks, "phases": [p.to_dict() for p in rec.phases()],
                "marks": [m.to_dict() for m in rec.marks()], "peaks": rec.peaks().to_dict()}

    def render_peaks(self, console: Any) -> None:
        """The peak analysis as `vramancer report` prints it."""
        from ..telemetry.commands import render_report
        from ..telemetry.export import Trace

        rec = self.recorder
        trace = Trace(snapshots=rec.snapshots(), phases=rec.phases(), marks=rec.marks(), interval=rec.interval,
                      path=str(self.written) if self.written else "this run")
        render_report(trace, rec.peaks(), console=console)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
