"""Every environment variable VRAMancer reads, in one registry with one default each.
Prefer CLI flags; these exist for secrets and for paths shared by many commands.

    VRAMANCER_API_KEY    bearer key `vramancer serve` requires (default: none; --api-key wins)
    VRAMANCER_CACHE_DIR  demo models and the disk tier (default: $XDG_CACHE_HOME/vramancer or ~/.cache/vramancer)
    HF_HUB_CACHE         the Hugging Face cache VRAMancer reads and `pull` fills, read at call time (default:
                         $HF_HOME/hub, HF_HOME defaulting to $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface)
    HF_ENDPOINT          the Hub `pull` / `plan HF_ID` talk to (default: https://huggingface.co)
    VRAMANCER_CONFIG     the config file (default: $XDG_CONFIG_HOME/vramancer/config.toml or ~/.config/...)
    VRAMANCER_NODE_DEVICES  the devices a cluster node offers (`cluster start|join --devices`; default: auto)
    VRAMANCER_GGUF_NUMBA  0/false/no/off: GGUF dequantization on the CPU uses torch ops, not the numba
                         kernels (default: on where numba is installed)
    VRAMANCER_LINK_PYTHON  1/true/yes/on: Link connections run every step in Python, not the compiled
                         steady state (vramancer/link/_fastlink.c); read when vramancer.link.transport is
                         first imported (default: off; the Python path anyway where it was not built)
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["ENV", "get", "parse_bool"]


def parse_bool(text: str) -> bool:
    """The one boolean parser: 1/true/yes/on and 0/false/no/off (any case)."""
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1/0, true/false, yes/no, on/off)")


def _default_hf_cache() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return str(Path(home).expanduser() / "hub")


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return str(Path(base) / "vramancer")


def _default_config() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return str(Path(base) / "vramancer" / "config.toml")


# name -> (default factory, converter)
ENV: dict[str, tuple[Callable[[], object], Callable[[str], object]]] = {
    "VRAMANCER_API_KEY": (lambda: None, str),
    "VRAMANCER_CACHE_DIR": (_default_cache, str),
    "HF_HUB_CACHE": (_default_hf_cache, lambda v: str(Path(v).expanduser())),
    "HF_ENDPOINT": (lambda: "https://huggingface.co", lambda v: v.rstrip("/")),
    "VRAMANCER_CONFIG": (_default_config, str),
    "VRAMANCER_NODE_DEVICES": (lambda: "auto", str),
    "VRAMANCER_GGUF_NUMBA": (lambda: True, lambda v: v.strip().lower() not in ("0", "false", "no", "off")),
    "VRAMANCER_LINK_PYTHON": (lambda: False, parse_bool),
}


def get(name: str):
    """The value of a registered variable (read at call time, never cached at import)."""
    default, convert = ENV[name]
    raw = os.environ.get(name)
    return default() if raw is None or raw == "" else convert(raw)
