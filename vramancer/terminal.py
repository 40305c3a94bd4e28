"""Output that fits where it goes: a terminal gets rich tables (which may wrap but never cut the
column a person must type), a pipe gets plain full rows with no colour; text a model wrote is
printed with its control bytes escaped, so an ANSI escape from a model never reaches the terminal.

rich already drops colour when the stream is not a terminal and honours ``NO_COLOR``.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["Column", "escape_control", "is_terminal", "plain_table", "print_table"]

# C0 controls but tab and newline, DEL, C1 controls (0x80-0x9f: a lone 0x9b is a CSI on some terminals)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """``text`` with every control character but newline and tab written as ``\\xNN`` (ESC [31m
    becomes the seven visible characters ``\\x1b[31m``); everything else unchanged."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:   # a closed stream
        return False


@dataclass(frozen=True)
class Column:
    """``key``: a column a person types back (a device or model name): never cut or folded."""

    header: str
    right: bool = False
    key: bool = False


def plain_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> str:
    """Space-aligned full rows under a header, for pipes: nothing cut, no colour, no box."""
    widths = [max([len(c.header)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        out = [str(cell).rjust(w) if c.right else str(cell).ljust(w)
               for cell, w, c in zip(cells, widths, columns, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line([c.header for c in columns])] + [line(r) for r in rows]) + "\n"


def print_table(console: Any, title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """A rich table under ``title`` on a terminal (key columns as wide as their longest cell, never
    truncated), plain rows (:func:`plain_table`, no title) anywhere else. ``rows`` are plain text, not rich markup."""
    if not console.is_terminal:   # the header row says enough; a title line would trip `cut`/`awk`
        console.file.write(plain_table(columns, rows))
        console.file.flush()
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title)
    for i, c in enumerate(columns):
        if c.key:
            width = max([len(c.header)] + [len(str(r[i])) for r in rows])
            t.add_column(c.header, justify="right" if c.right else "left", no_wrap=True, min_width=width)
        else:
            t.add_column(c.header, justify="right" if c.right else "left", overflow="fold")
    for r in rows:
        t.add_row(*(Text(str(x)) for x in r))
    console.print(t)
