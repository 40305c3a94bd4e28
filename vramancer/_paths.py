"""Where VRAMancer keeps files: one cache folder (demo models, disk-tier offload)."""
from __future__ import annotations

from pathlib import Path

from . import envs

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """$VRAMANCER_CACHE_DIR, else $XDG_CACHE_HOME/vramancer (or ~/.cache/vramancer); not created here."""
    return Path(envs.get("VRAMANCER_CACHE_DIR"))
