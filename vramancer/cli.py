"""The `vramancer` command: parse, call, print. Each subcommand lives in its own module,
imported only when that subcommand runs, so `vramancer plan` never imports torch.

A subcommand module provides ``configure(parser)`` (add its flags) and ``main(args) -> int``.
Errors: a VramancerError prints one line and returns its exit code (2 bad input, 3 does not
fit, 1 other); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

__all__ = ["COMMANDS", "build_parser", "given_options", "main"]

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
    "pull": ("vramancer.hub.commands.pull", "download a Hub model's safetensors (all, or one plan stage's shards)"),
    "convert": ("vramancer.hub.commands.convert", "convert .bin / GGUF / dtype / plan shards to a safetensors folder"),
    "keys": ("vramancer.link.commands", "this node's Link identity key and the peer fingerprints it trusts"),
    "cluster": ("vramancer.cluster.commands", "several machines: start / join / status / stop a Ray cluster"),
    "comfyui": ("vramancer.integrations.comfyui.commands", "install VRAMancer's nodes into a ComfyUI folder"),
    "completion": ("vramancer.completion", "print a shell completion script (bash, zsh or fish)"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(module)


class _VersionAction(argparse.Action):
    """--version: vramancer, python, torch, CUDA and driver versions (torch imported only here)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from .about import version_text

        print(version_text())
        parser.exit()


def _add_common_flags(p: argparse.ArgumentParser, default) -> None:
    """--debug, -v/--verbose, -q/--quiet: accepted before the command and after it."""
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    p.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                   help="more log lines (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="errors and results only: no progress or info lines")


_MAX_ERROR_CHARS = 2000


class _Parser(argparse.ArgumentParser):
    """argparse with VRAMancer's error contract: a usage error is one line on stderr,
    ``vramancer: error: [COMMAND: ]message``, and exit 2 (no usage dump); subcommand parsers are
    of this class too. Values that start like a negative number (``--split -1,2``) are values,
    not options, so the command can say what is wrong with them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):  # type: ignore[override]
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        text = " ".join(str(message).split())
        if len(text) > _MAX_ERROR_CHARS:
            text = f"{text[:_MAX_ERROR_CHARS]} ... ({len(text) - _MAX_ERROR_CHARS} more characters)"
        self.exit(2, f"vramancer: error: {where}{text}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vramancer",
        description="Split AI models across the GPUs you own; see where the VRAM goes.",
        epilog="Defaults for --devices, --reserve, --context, --dtype and --backing can live in "
               "~/.config/vramancer/config.toml (see vramancer/config.py); flags win.",
    )
    parser.add_argument("-V", "--version", action=_VersionAction,
                        help="print the vramancer, python, torch, CUDA and driver versions")
    _add_common_flags(parser, None)
    parser.set_defaults(debug=False, quiet=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common_flags(p, argparse.SUPPRESS)
        if only is None or only == name:
            try:
                _load(name).configure(p)
            except ModuleNotFoundError as e:
                if only == name:
                    raise
                p.description = f"{help_text} (unavailable: {e})"
            if only == name:
                from .config import config_defaults

                p.set_defaults(**config_defaults(name))
    return parser


def given_options(parser: argparse.ArgumentParser, argv: list[str], command: str) -> frozenset[str]:
    """The dests of ``command``'s options typed on the command line (not defaults, not the
    config file): parse its arguments again with every default suppressed."""
    subparsers = parser._subparsers._group_actions[0].choices
    p = subparsers[command]
    rest = argv[argv.index(command) + 1:]
    dests = [a.dest for a in p._actions
             if a.option_strings and a.dest != argparse.SUPPRESS and not isinstance(a, argparse._CountAction)]
    saved = {d: p.get_default(d) for d in dests}
    unset = object()
    p.set_defaults(**dict.fromkeys(dests, unset))
    try:
        ns, _ = p.parse_known_args(rest)
    finally:
        p.set_defaults(**saved)
    return frozenset(k for k, v in vars(ns).items() if v is not unset and k in saved)


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(verbose: int, quiet: bool) -> None:
    """vramancer's own loggers: warnings by default, -v info, -vv debug, -q errors only."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else
                                         logging.INFO if verbose == 1 else logging.WARNING)
    log = logging.getLogger("vramancer")
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("vramancer: %(levelname)s: %(message)s"))
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    from .errors import VramancerError

    argv = list(sys.argv[1:] if argv is None else argv)
    # Configure only the subcommand asked for: `vramancer plan` imports only the planner.
    only = next((a for a in argv if a in COMMANDS), None)
    debug = "--debug" in argv
    try:
        parser = build_parser(only)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # a usage error (one line, exit 2), --help or --version (exit 0)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not args.command:
            parser.print_help()
            return 0
        _configure_logging(args.verbose, args.quiet)
        args.given = given_options(parser, argv, args.command)
        if hasattr(args, "trusted_network"):   # plan / run / serve: the cluster's flags need --cluster
            from .cluster.commands import refuse_link_flags_without_cluster

            refuse_link_flags_without_cluster(args)
        return int(_load(args.command).main(args) or 0)
    except VramancerError as e:
        if debug:
            raise
        line = " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
        if len(line) > _MAX_ERROR_CHARS:   # a message quoting a hostile input (a 1 MB name) stays readable
            line = f"{line[:_MAX_ERROR_CHARS]} ... ({len(line) - _MAX_ERROR_CHARS} more characters)"
        print(f"vramancer: error: {line}", file=sys.stderr)
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
