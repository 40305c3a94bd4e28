"""Typed reading of a JSON object a person may have edited: each field read with its type and range
checked, every failure one ``BadInputError`` line naming the field's path (``stages[1].blocks``).

    r = FieldReader(doc, "malformed plan: ")
    context = r.obj("workload").int("context", lo=1)
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import BadInputError

__all__ = ["FieldReader", "MAX_BYTES"]

MAX_BYTES = 1 << 62          # far beyond any memory: a larger "byte count" is a typo or an attack
_MISSING = object()


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class FieldReader:
    """Fields of one JSON object ``doc`` at ``path`` (empty for the top level); errors start with ``prefix``."""

    def __init__(self, doc: Any, prefix: str, path: str = ""):
        self.prefix = prefix
        self.path = path
        if not isinstance(doc, dict):
            raise self.error(f"expected an object, got {type(doc).__name__}")
        self.doc = doc

    def error(self, message: str, key: str | None = None) -> BadInputError:
        where = self.where(key)
        return BadInputError(f"{self.prefix}{where + ': ' if where else ''}{message}")

    def where(self, key: str | int | None) -> str:
        if key is None:
            return self.path
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.doc:
            return self.doc[key]
        if default is _MISSING:
            raise self.error("missing", key)
        return default

    # -- scalars ------------------------------------------------------------------------------
    def int(self, key: str, lo: int = 0, hi: int = MAX_BYTES, default: Any = _MISSING) -> int:
        return self.check_int(self.raw(key, default), key, lo, hi)

    def check_int(self, v: Any, key: str | int, lo: int = 0, hi: int = MAX_BYTES) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected a whole number, got {_show(v)}", key)   # type: ignore[arg-type]
        if not lo <= v <= hi:
            raise self.error(f"{v} is outside [{lo}, {hi}]", key)              # type: ignore[arg-type]
        return v

    def optional_int(self, key: str, lo: int = 0, hi: int = MAX_BYTES) -> int | None:
        v = self.raw(key, None)
        return None if v is None else self.check_int(v, key, lo, hi)

    def float(self, key: str, lo: float = 0.0, hi: float = math.inf, default: Any = _MISSING) -> float:
        return self.check_float(self.raw(key, default), key, lo, hi)

    def check_float(self, v: Any, key: str | int, lo: float = 0.0, hi: float = math.inf) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(f"expected a number, got {_show(v)}", key)          # type: ignore[arg-type]
        if not math.isfinite(v) or not lo <= v <= hi:
            raise self.error(f"{v!r} is outside [{lo:g}, {hi:g}]", key)          # type: ignore[arg-type]
        return float(v)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise self.error(f"expected true or false, got {_show(v)}", key)
        return v

    def str(self, key: str, choices: tuple[str, ...] | None = None, default: Any = _MISSING,
            nullable: bool = False, nonempty: bool = False) -> Any:
        v = self.raw(key, default)
        if v is None and nullable:
            return None
        if not isinstance(v, str):
            raise self.error(f"expected a string, got {_show(v)}", key)
        if choices is not None and v not in choices:
            raise self.error(f"{_show(v)} is not one of {', '.join(choices)}", key)
        if nonempty and not v:
            raise self.error("must not be empty", key)
        return v

    # -- containers ---------------------------------------------------------------------------
    def obj(self, key: str, default: Any = _MISSING) -> FieldReader:
        return FieldReader(self.raw(key, default), self.prefix, self.where(key))

    def list(self, key: str, default: Any = _MISSING, max_len: int = 1 << 20) -> list:
        v = self.raw(key, default)
        if not isinstance(v, list):
            raise self.error(f"expected a list, got {_show(v)}", key)
        if len(v) > max_len:
            raise self.error(f"{len(v)} items, at most {max_len}", key)
        return v

    def objs(self, key: str, default: Any = _MISSING) -> list[FieldReader]:
        where = self.where(key)
        return [FieldReader(x, self.prefix, f"{where}[{i}]") for i, x in enumerate(self.list(key, default))]

    def strs(self, key: str, default: Any = _MISSING) -> list[str]:
        items = self.list(key, default)
        for i, x in enumerate(items):
            if not isinstance(x, str):
                raise self.error(f"item {i}: expected a string, got {_show(x)}", key)
        return list(items)

    def str_map(self, key: str, default: Any = _MISSING) -> dict[str, str]:
        v = self.raw(key, default)
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise self.error("expected an object of strings", key)
        return dict(v)
