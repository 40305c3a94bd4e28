"""VRAMancer's ComfyUI nodes: Split model over GPUs, CLIP to device, VAE to device, VRAM report.

ComfyUI loads them through the small package ``vramancer comfyui install PATH`` writes into
``PATH/custom_nodes/vramancer/`` (it imports ``NODE_CLASS_MAPPINGS``, ``NODE_DISPLAY_NAME_MAPPINGS``
and ``WEB_DIRECTORY`` from here). Importing this package imports neither ComfyUI nor torch; the nodes
import them when they run. See docs/comfyui.md.
"""
from __future__ import annotations

import os

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

# ComfyUI serves the files of this folder to its frontend (web/vramancer.js shows the nodes' text)
WEB_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
