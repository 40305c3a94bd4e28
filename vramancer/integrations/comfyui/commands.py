"""``vramancer comfyui install PATH``: make a ComfyUI folder load VRAMancer's nodes.

Writes ``PATH/custom_nodes/vramancer/__init__.py``, a loader that imports
``vramancer.integrations.comfyui`` (from ComfyUI's Python when vramancer is installed there, else
from the checkout or site-packages this command ran from, which is added to ``sys.path``). PATH must be
a ComfyUI tree (``main.py``, ``comfy/``, ``custom_nodes/``) or a ComfyUI base directory (``models/``,
``custom_nodes/``; ``--base-directory``, ComfyUI Desktop): anything else is refused in one line
(exit 2) with nothing written. Running it again rewrites the same loader (idempotent); a
``custom_nodes/vramancer`` folder that another tool wrote is refused, never overwritten.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ...errors import BadInputError

__all__ = ["configure", "main", "install", "loader_source", "LOADER_MARKER"]

LOADER_MARKER = "# written by `vramancer comfyui install`"


def loader_source(vramancer_root: str) -> str:
    """The loader package's __init__.py; ``vramancer_root`` is the folder holding the vramancer package."""
    return f'''"""VRAMancer nodes for ComfyUI: Split model over GPUs, CLIP to device, VAE to device, VRAM report."""
{LOADER_MARKER}; run it again after moving vramancer, remove this folder to uninstall
try:
    import vramancer.integrations.comfyui as _nodes
except ImportError:     # ComfyUI's Python lacks vramancer: the copy that installed this loader
    import sys

    sys.path.append({vramancer_root!r})
    import vramancer.integrations.comfyui as _nodes

NODE_CLASS_MAPPINGS = _nodes.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = _nodes.NODE_DISPLAY_NAME_MAPPINGS
WEB_DIRECTORY = _nodes.WEB_DIRECTORY
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
'''


def _check_comfyui(root: Path) -> None:
    """A ComfyUI source tree (main.py, comfy/, custom_nodes/) or a ComfyUI base directory (what
    ``--base-directory`` / ComfyUI Desktop use: models/ and custom_nodes/)."""
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise BadInputError(f"{root}: {what} (expected a ComfyUI folder)")
    tree = (root / "main.py").is_file() and (root / "comfy").is_dir()
    base = (root / "models").is_dir()
    if not (root / "custom_nodes").is_dir() or not (tree or base):
        raise BadInputError(f"{root} is not a ComfyUI folder (neither main.py + comfy/ + custom_nodes/ nor a base "
                            "directory with models/ + custom_nodes/)")


def install(path: str | os.PathLike) -> tuple[Path, bool]:
    """Write the loader into ``path``; returns (loader file, whether it changed)."""
    import vramancer

    root = Path(path).expanduser()
    _check_comfyui(root)
    folder = root / "custom_nodes" / "vramancer"
    target = folder / "__init__.py"
    text = loader_source(str(Path(vramancer.__file__).resolve().parent.parent))
    if folder.exists():
        if not folder.is_dir():
            raise BadInputError(f"{folder} exists and is not a folder; remove it first")
        current = target.read_text(encoding="utf-8", errors="replace") if target.is_file() else None
        others = [p.name for p in folder.iterdir() if p.name not in ("__init__.py", "__pycache__")]
        if current is None or LOADER_MARKER not in current or others:
            raise BadInputError(f"{folder} exists and was not written by vramancer comfyui install; "
                                "move it away first")
        if current == text:
            return target, False
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".__init__.py.{os.getpid()}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target, True


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    inst = sub.add_parser("install", help="write the loader into PATH/custom_nodes/vramancer/")
    inst.add_argument("path", metavar="PATH", help="the ComfyUI folder (main.py, comfy/, custom_nodes/) or its base "
                      "directory (models/, custom_nodes/)")


def main(args: argparse.Namespace) -> int:
    target, changed = install(args.path)
    if changed:
        print(f"installed: {target} (restart ComfyUI; the nodes are under the VRAMancer category)")
    else:
        print(f"already installed: {target}")
    return 0
