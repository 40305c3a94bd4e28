"""The live-view subcommands: ``vramancer monitor``, ``vramancer dashboard``, ``vramancer gui``.

Each module here imports only argparse-level code at top level; its toolkit (textual,
FastAPI + uvicorn, PySide6) is imported inside ``main`` so that ``vramancer --help`` stays fast.
"""
from __future__ import annotations

import argparse

from ...errors import BadInputError

__all__ = ["add_duration_argument", "check_duration", "missing_toolkit"]


def add_duration_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="stop after S seconds (default: run until stopped)")


def check_duration(duration_s: float | None) -> float | None:
    if duration_s is not None and not (duration_s >= 0):   # also refuses NaN
        raise BadInputError(f"--duration must be 0 or more seconds, got {duration_s:g}")
    return duration_s


def missing_toolkit(command: str, package: str, extra: str, error: ModuleNotFoundError) -> str:
    """One line for a toolkit that is not installed."""
    return (f"`vramancer {command}` needs {package} ({error.name} is not installed); "
            f"install it with: pip install 'vramancer[{extra}]'")
