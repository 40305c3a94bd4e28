"""The ComfyUI node classes: Split model over GPUs, CLIP to device, VAE to device, VRAM report.

ComfyUI reads each class's ``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION`` / ``CATEGORY``; a node
returning ``{"ui": {"text": [...]}, "result": (...)}`` shows the text on the node (web/vramancer.js)
and in the prompt's ``/history`` entry. ComfyUI is imported only when a node runs.
"""
from __future__ import annotations

import copy
import uuid
from typing import Any

from ...errors import BadInputError
from .report import TRACKER, track_module
from .split import split_model

__all__ = ["SplitModel", "ClipToDevice", "VaeToDevice", "VramReport", "NODE_CLASS_MAPPINGS",
           "NODE_DISPLAY_NAME_MAPPINGS", "parse_torch_device"]

CATEGORY = "VRAMancer"


def parse_torch_device(text: str) -> Any:
    """"cpu", "cuda:N" (or "cuda"), "mps": a torch device this machine has; BadInputError otherwise."""
    import torch

    low = str(text).strip().lower()
    try:
        dev = torch.device(low)
    except (RuntimeError, ValueError):
        raise BadInputError(f"device {text!r:.60}: not cpu, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= n:
            raise BadInputError(f"device {text!r:.60}: this machine has {n} CUDA device{'s' if n != 1 else ''}")
        return torch.device("cuda", index)
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise BadInputError("device 'mps': not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BadInputError(f"device {text!r:.60}: not cpu, cuda:N or mps")
    return dev


def _first_device(module: Any) -> Any:
    import torch

    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class SplitModel:
    """MODEL in, MODEL out: the denoiser's blocks stored and run on the devices VRAMancer plans."""

    DESCRIPTION = ("Plans the denoiser's blocks over the devices (a VRAMancer spec such as "
                   "'cuda:0,cuda:1', 'rtx3090,rtx3060:8GiB', or 'auto' for this machine's GPUs) and runs each "
                   "block where it is stored, through ComfyUI's model management (LoRAs and unloading keep "
                   "working). The plan is shown on the node.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",),
            "devices": ("STRING", {"default": "auto", "multiline": False}),
            "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "cfg": ("BOOLEAN", {"default": True, "tooltip": "classifier-free guidance (cfg > 1): twice the batch"}),
        }, "optional": {
            "split": ("STRING", {"default": "", "tooltip": "manual proportions over the devices, e.g. 3,1"}),
            "reserve": ("STRING", {"default": "", "tooltip": "memory kept free per GPU, e.g. 1GiB"}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "plan")
    FUNCTION = "split"
    CATEGORY = CATEGORY
    OUTPUT_NODE = False

    def split(self, model: Any, devices: str, width: int, height: int, batch_size: int, cfg: bool,
              split: str = "", reserve: str = "") -> dict:
        m, state = split_model(model, devices.strip() or "auto", height=height, width=width, batch=batch_size,
                               cfg=bool(cfg), split=split.strip() or None, reserve=reserve.strip() or None)
        return {"ui": {"text": [state.text]}, "result": (m, state.text)}


class ClipToDevice:
    """CLIP in, CLIP out: the text encoders load on and run on the device given."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"clip": ("CLIP",), "device": ("STRING", {"default": "cpu"})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "place"
    CATEGORY = CATEGORY

    def place(self, clip: Any, device: str) -> tuple:
        dev = parse_torch_device(device)
        c = clip.clone()
        c.patcher.load_device = dev
        # a clone of its own weights in ComfyUI's eyes: switching from the original (loaded elsewhere)
        # unpatches and loads it again, onto this device, instead of keeping it where it is
        c.patcher.patches_uuid = uuid.uuid4()
        track_module(c.cond_stage_model, lambda name: "encode", lambda m=c.cond_stage_model: _first_device(m))
        return (c,)


_VAE_PHASES = {"decoder": "decode", "post_quant_conv": "decode", "encoder": "vae encode", "quant_conv": "vae encode"}


class VaeToDevice:
    """VAE in, VAE out: the VAE loads on and runs on the device given."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae": ("VAE",), "device": ("STRING", {"default": "cpu"})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "place"
    CATEGORY = CATEGORY

    def place(self, vae: Any, device: str) -> tuple:
        dev = parse_torch_device(device)
        v = copy.copy(vae)
        v.patcher = vae.patcher.clone()
        v.patcher.load_device = dev
        v.patcher.patches_uuid = uuid.uuid4()      # see ClipToDevice
        v.device = dev
        track_module(v.first_stage_model, _VAE_PHASES.get, lambda m=v.first_stage_model: _first_device(m))
        return (v,)


class VramReport:
    """The peak memory per device and phase of the last run, as text (after the images it waits for)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "report"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")     # never cached: each run has its own peaks

    def report(self, images: Any) -> dict:
        text = TRACKER.report()
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "VRAMancerSplitModel": SplitModel,
    "VRAMancerClipToDevice": ClipToDevice,
    "VRAMancerVaeToDevice": VaeToDevice,
    "VRAMancerVramReport": VramReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VRAMancerSplitModel": "Split model over GPUs (VRAMancer)",
    "VRAMancerClipToDevice": "CLIP to device (VRAMancer)",
    "VRAMancerVaeToDevice": "VAE to device (VRAMancer)",
    "VRAMancerVramReport": "VRAM report (VRAMancer)",
}
