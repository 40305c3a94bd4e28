"""Units for people: byte sizes (parse "10GiB" / "500MB" / "1.5G" into ints, format ints; GiB = 2**30)
and wall-clock times ("2025-01-31T14:03:07.250", local time)."""
from __future__ import annotations

import math
import re
import time

from .errors import BadInputError

__all__ = ["parse_bytes", "format_bytes", "iso_time", "GiB", "MiB", "KiB", "TiB"]

KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 10**3,
    "m": MiB, "mib": MiB, "mb": 10**6,
    "g": GiB, "gib": GiB, "gb": 10**9,
    "t": TiB, "tib": TiB, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """"10GiB" -> 10737418240. Bare "G"/"M" are binary (like llama.cpp and nvidia-smi); "GB" is decimal."""
    if isinstance(text, bool):
        raise BadInputError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        if isinstance(text, float) and not math.isfinite(text):
            raise BadInputError(f"not a size: {text!r}")
        if text < 0:
            raise BadInputError(f"size must not be negative: {text}")
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise BadInputError(f"not a size: {text!r} (examples: 10GiB, 512MiB, 24GB)")
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise BadInputError(f"unknown size unit {unit!r} in {text!r} (use KiB, MiB, GiB, TiB, MB, GB)")
    value = float(number) * factor
    if not math.isfinite(value):
        raise BadInputError(f"not a size: {text!r} (too large)")
    return int(value)


def format_bytes(n: int | float, precision: int = 1, *, compact: bool = False) -> str:
    """1.5 * 2**30 -> "1.5 GiB"; ``compact`` for table cells: "1.5G", "47.2M", "212.0K", "512".
    Binary units (GiB = 2**30) in both forms; the one byte formatter of the project."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.{precision}f}{unit[0] if compact else ' ' + unit}"
    return f"{sign}{int(n)}" + ("" if compact else " B")


def iso_time(timestamp: float) -> str:
    """Local time with milliseconds: "2025-01-31T14:03:07.250"."""
    whole = int(timestamp)
    millis = int(round((timestamp - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(whole)) + f".{millis:03d}"
