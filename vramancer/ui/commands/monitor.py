"""``vramancer monitor``: live VRAM in the terminal (textual), or one line per sample with --no-tui.

    vramancer monitor [--devices SPEC] [--interval S] [--duration S] [--export FILE] [--no-tui]

Keys in the TUI: e export (to --export, else a timestamped CSV + JSON pair here), p pause the
display (recording goes on), q quit. ``--export FILE`` (.csv or .json) is also written on exit.
``--no-tui`` line format (one per sample, flushed):
    2025-01-31T14:03:07.250 rtx3090#0 1.25/24.00 GiB | cpu 10.02/62.70 GiB phase=load
``--json`` (implies ``--no-tui``): one JSON object per sample per line (``Snapshot.to_dict()``).
"""
from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path

from ...errors import VramancerError
from . import add_duration_argument, check_duration, missing_toolkit

__all__ = ["configure", "main", "run_lines"]


def configure(parser: argparse.ArgumentParser) -> None:
    from ..source import add_source_arguments

    add_source_arguments(parser)
    add_duration_argument(parser)
    parser.add_argument("--export", metavar="FILE", default=None,
                        help="write the recorded trace here (.csv or .json) on exit and on the e key")
    parser.add_argument("--no-tui", action="store_true",
                        help="print one line per sample instead of the terminal UI (for logs and pipes)")
    parser.add_argument("--json", action="store_true",
                        help="with --no-tui (implied): one JSON object per sample, one per line (JSON lines)")


def run_lines(recorder, duration_s: float | None, out=None, as_json: bool = False) -> int:
    """Start ``recorder``, print one line per snapshot until ``duration_s`` passes (or Ctrl-C),
    the recorder's first and last snapshots always (a run shows its start and its end however
    slow the machine); ``as_json``: each line is the snapshot as a JSON object. What a sampler could not read goes
    to stderr, once each time it changes."""
    import json

    from ..view import sample_line

    out = out or sys.stdout
    said_missing: list[str] = []

    def show(snap) -> None:
        nonlocal said_missing
        out.write((json.dumps(snap.to_dict()) if as_json else sample_line(snap)) + "\n")
        out.flush()
        if snap.missing and snap.missing != said_missing:
            print("vramancer monitor: missing: " + "; ".join(snap.missing), file=sys.stderr)
        said_missing = snap.missing

    subscription = recorder.subscribe()
    try:
        with recorder:
            deadline = None if duration_s is None else time.monotonic() + duration_s
            while True:
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    break
                try:
                    snap = subscription.get(timeout=wait)
                except queue.Empty:
                    snap = None
                if snap is not None:
                    show(snap)
        # what is left: at least the last sample, taken as the recorder stops (and the first one,
        # however slow this machine was to start): a run always shows its start and its end
        for snap in subscription.drain():
            show(snap)
    finally:
        subscription.close()
    return 0


def main(args: argparse.Namespace) -> int:
    from ..source import export_format, recorder_from_args

    duration_s = check_duration(args.duration)
    export = Path(args.export) if args.export else None
    if export is not None:
        export_format(export)          # a bad suffix is bad input before anything runs
        from ..._io import check_writable

        check_writable(args.export, "--export")   # and a path it cannot write, before any sampling
    recorder = recorder_from_args(args)
    use_tui = not args.no_tui and not args.json
    if use_tui and not sys.stdout.isatty():
        print("vramancer monitor: stdout is not a terminal; printing one line per sample (--no-tui)",
              file=sys.stderr)
        use_tui = False
    try:
        if not use_tui:
            try:
                return run_lines(recorder, duration_s, as_json=args.json)
            except BrokenPipeError:        # `vramancer monitor --no-tui | head`
                sys.stdout = None          # type: ignore[assignment]  (nothing more to flush)
                return 0
        try:
            from ..tui import MonitorApp
        except ModuleNotFoundError as e:
            raise VramancerError(missing_toolkit("monitor", "textual", "ui", e)
                                 + " (or use --no-tui)") from None
        with recorder:
            app = MonitorApp(recorder, interval_s=args.interval, export_path=export, duration_s=duration_s)
            code = app.run()
        for path in app.exported:
            print(f"exported {path}", file=sys.stderr)
        return int(code or 0)
    finally:
        if export is not None and recorder.snapshots():
            for path in _export_or_keep(recorder, export):
                print(f"wrote {path}", file=sys.stderr)


def _export_or_keep(recorder, export: Path) -> list[Path]:
    """Write the trace to ``export``; when that fails after the sampling (its folder removed or
    filled meanwhile), keep the samples in the temp folder and say where, in the one error line."""
    import tempfile

    from ..source import export_trace

    try:
        return export_trace(recorder, export)
    except (VramancerError, OSError) as e:
        why = str(e) if isinstance(e, VramancerError) else f"cannot write {export}: {e.strerror or e}"
        try:
            kept = export_trace(recorder, None, directory=tempfile.gettempdir())
        except (VramancerError, OSError):
            raise VramancerError(why) from None
        raise VramancerError(f"{why}; the samples are kept in {', '.join(map(str, kept))}") from None
