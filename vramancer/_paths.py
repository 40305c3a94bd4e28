"""Where VRAMancer keeps files: one cache folder (demo models, disk-tier offload)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/vramancer (or ~/.cache/vramancer); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramancer"
