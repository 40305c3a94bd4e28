"""The Hub's CLI subcommands: ``pull`` and ``convert`` (each ``configure(parser)`` + ``main(args)``)."""
from __future__ import annotations

__all__: list[str] = []
