"""``vramancer gui``: a desktop window (PySide6 + pyqtgraph) with live memory charts per device,
the process table and the peaks.

    vramancer gui [--devices SPEC] [--interval S] [--duration S] [--screenshot FILE.png]
"""
from __future__ import annotations

import argparse

from ...errors import VramancerError
from . import add_duration_argument, check_duration, missing_toolkit

__all__ = ["configure", "main"]


def configure(parser: argparse.ArgumentParser) -> None:
    from ..source import add_source_arguments

    add_source_arguments(parser)
    add_duration_argument(parser)
    parser.add_argument("--screenshot", metavar="FILE", default=None,
                        help="save a PNG of the window when it closes (with --duration: for reports)")


def main(args: argparse.Namespace) -> int:
    from ..source import recorder_from_args

    duration_s = check_duration(args.duration)
    try:
        from ..qt import emit_leaks_bools, has_display, run_gui
    except ModuleNotFoundError as e:
        raise VramancerError(missing_toolkit("gui", "PySide6 and pyqtgraph", "ui", e)) from None
    except ImportError as e:   # PySide6 present but its system libraries (libGL, libEGL...) are not
        raise VramancerError(f"`vramancer gui` cannot load Qt: {e}") from None
    if not has_display():
        raise VramancerError("`vramancer gui` needs a display (DISPLAY or WAYLAND_DISPLAY is not set); "
                             "use `vramancer monitor` or `vramancer dashboard`, or set QT_QPA_PLATFORM=offscreen")
    if emit_leaks_bools():
        import PySide6

        raise VramancerError(f"PySide6 {PySide6.__version__} drops a reference on every Qt signal and would crash "
                             f"this Python after a few minutes; install another version: "
                             f"pip install 'PySide6-Essentials!={PySide6.__version__}'")
    recorder = recorder_from_args(args)
    with recorder:
        return run_gui(recorder, interval_s=args.interval, duration_s=duration_s, screenshot=args.screenshot)
