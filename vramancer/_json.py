"""The one way VRAMancer reads JSON a person hands it (config.json, safetensors headers, plan files,
telemetry traces, index files): every way the bytes can be wrong becomes one VramancerError line.

    read_json_file(path, error=MalformedCheckpointError, what="config")
    parse_json(raw, error=TraceFileError, prefix=f"{path}: ")

What is caught, and the detail it gives (after ``prefix``, which by default names what and where):
    a file that cannot be read          cannot read {what} {path}: {reason}
    a folder, a missing file            {what} {path}: is a folder / no such file
    more than ``max_bytes``             {n} bytes is more than the {limit} a {what} may have
    an empty file                       empty file
    bytes that are not UTF-8            not UTF-8 text (byte {i})
    a syntax error                      line {l} column {c}: malformed JSON ({msg})
    a document cut short                line {l} column {c}: truncated JSON ({msg})
    nesting deeper than the parser can  nested deeper than {MAX_DEPTH} levels
Only the first ``max_bytes + 1`` bytes of a file are ever read, so a huge (or endless) file costs
bounded memory. Nesting is counted before parsing (regexes and string passes, no recursion), so a
100,000-deep document is refused without recursing at all.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from .errors import BadInputError, VramancerError

__all__ = ["DEFAULT_MAX_BYTES", "MAX_DEPTH", "check_json_files", "nested_deeper_than", "parse_json",
           "read_json_file"]

MAX_DEPTH = 512                   # far beyond any real config / plan / trace (they nest < 10 deep)
DEFAULT_MAX_BYTES = 256 * 2**20   # 256 MiB


_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_ASCII_NOT_BRACKETS = str.maketrans("", "", "".join(chr(i) for i in range(128) if chr(i) not in "[]{}"))


def _bracket_depth(brackets: str, limit: int) -> int:
    """Nesting depth of a string of brackets, counted up to ``limit + 1``: each pass removes the
    innermost ``[]`` / ``{}`` pairs, so the number of passes is the depth."""
    depth = 0
    while brackets and depth <= limit:
        shorter = brackets.replace("[]", "").replace("{}", "")
        if len(shorter) == len(brackets):
            break                       # unbalanced: the parser says where
        brackets = shorter
        depth += 1
    return depth


def nested_deeper_than(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether ``text`` nests ``[`` / ``{`` (outside strings) more than ``limit`` deep. No
    recursion and C-speed passes: a bound counting brackets inside strings too comes first;
    only when it exceeds ``limit`` are strings cut out for the exact count."""
    if text.count("[") + text.count("{") <= limit:
        return False
    rough = text.translate(_ASCII_NOT_BRACKETS)
    if rough.isascii() and _bracket_depth(rough, limit) <= limit:
        return False
    return _bracket_depth(_NOT_BRACKET_RE.sub("", _STRING_RE.sub("", text)), limit) > limit


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8-sig")


def parse_json(raw: str | bytes, *, error: type[VramancerError] = BadInputError,
               prefix: str = "malformed JSON: ", max_depth: int = MAX_DEPTH) -> Any:
    """``raw`` parsed as JSON; ``error(prefix + detail)`` on bytes that are not UTF-8 JSON of
    sane depth (details in the module docstring)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = _decode(bytes(raw))
        except UnicodeDecodeError as e:
            raise error(f"{prefix}not UTF-8 text (byte {e.start} is not UTF-8)") from None
    else:
        text = raw
    if not text.strip():
        raise error(f"{prefix}empty file (no JSON)")
    if nested_deeper_than(text, max_depth):
        raise error(f"{prefix}nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "truncated JSON" if e.pos >= len(text.rstrip()) else "malformed JSON"
        raise error(f"{prefix}line {e.lineno} column {e.colno}: {what} ({e.msg})") from None
    except RecursionError:  # the depth scan makes this unreachable; kept as the last guard
        raise error(f"{prefix}nested deeper than {max_depth} levels") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer with more digits than int() allows
        raise error(f"{prefix}{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_json_file(path: str | os.PathLike, *, error: type[VramancerError] = BadInputError, what: str = "JSON file",
                   max_bytes: int = DEFAULT_MAX_BYTES, prefix: str | None = None) -> Any:
    """The JSON value in the file ``path``. ``what`` names the file in messages ("config",
    "plan", "safetensors index"); ``prefix`` replaces the default ``"malformed {what} {path}: "``."""
    p = Path(path)
    pre = f"malformed {what} {p}: " if prefix is None else prefix
    try:   # a FIFO or device would block or never end: only regular files (and folders, said below)
        st = os.stat(p)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise error(f"{what} {p}: not a regular file")
    except FileNotFoundError:
        raise error(f"{what} {p}: no such file") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise error(f"{what} {p} is a folder, not a file")
            if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
                raise error(f"{pre}{st.st_size} bytes is more than the {max_bytes} a {what} may have")
            raw = f.read(max_bytes + 1)
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder, not a file") from None
    except FileNotFoundError:
        raise error(f"{what} {p}: no such file") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise error(f"{pre}more than the {max_bytes} bytes a {what} may have")
    return parse_json(raw, error=error, prefix=pre)


def check_json_files(folder: str | os.PathLike, error: type[VramancerError] | None = None) -> None:
    """Every ``*.json`` at the top of a model folder reads as JSON (size, UTF-8, syntax, depth), so
    the libraries that read them later (transformers: tokenizer, generation and chat-template
    configs) meet none that would end in a traceback or a RecursionError. Default error:
    MalformedCheckpointError naming the file."""
    from .errors import MalformedCheckpointError

    for p in sorted(Path(folder).glob("*.json")):
        read_json_file(p, error=error or MalformedCheckpointError, what="model file")
