"""The `vramancer` command: parse, call, print. Each subcommand lives in its own module,
imported only when that subcommand runs, so `vramancer plan` never imports torch.

A subcommand module provides ``configure(parser)`` (add its flags) and ``main(args) -> int``.
Errors: a VramancerError prints one line and returns its exit code (2 bad input, 3 does not
fit, 1 other); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMANDS"]

# name -> (module, one-line help). Order is the order `vramancer --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "devices": ("vramancer.devices.commands", "list the devices a plan can use (real or simulated)"),
    "plan": ("vramancer.plan.commands", "plan how to split a model over devices, without loading it"),
    "run": ("vramancer.runtime.commands.run", "load a model split over devices and generate from a prompt"),
    "chat": ("vramancer.runtime.commands.chat", "chat with a split model"),
    "demo": ("vramancer.runtime.commands.demo", "build a small model, split it, generate, and check the output"),
    "monitor": ("vramancer.ui.commands.monitor", "live VRAM monitor in the terminal"),
    "report": ("vramancer.telemetry.commands", "peak analysis and chart of a recorded trace"),
    "dashboard": ("vramancer.ui.commands.dashboard", "live VRAM web dashboard with Prometheus /metrics"),
    "gui": ("vramancer.ui.commands.gui", "live VRAM desktop window"),
    "serve": ("vramancer.serve.commands", "OpenAI-compatible HTTP server for a split model"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(module)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vramancer",
        description="Split AI models across the GPUs you own; see where the VRAM goes.",
    )
    parser.add_argument("--version", action="version", version=f"vramancer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        if only is None or only == name:
            try:
                _load(name).configure(p)
            except ModuleNotFoundError as e:
                if only == name:
                    raise
                p.description = f"{help_text} (unavailable: {e})"
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import VramancerError

    argv = list(sys.argv[1:] if argv is None else argv)
    # Configure only the subcommand asked for: `vramancer plan` imports only the planner.
    only = next((a for a in argv if a in COMMANDS), None)
    debug = "--debug" in argv
    try:
        parser = build_parser(only)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 0
        return int(_load(args.command).main(args) or 0)
    except VramancerError as e:
        if debug:
            raise
        print(f"vramancer: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except MemoryError as e:
        if debug:
            raise
        print(f"vramancer: error: out of host memory: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
