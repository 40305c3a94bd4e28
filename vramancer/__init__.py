"""VRAMancer: split AI models across the GPUs you own, planned from a memory and speed model.

    import vramancer
    devices = vramancer.parse_devices("rtx3090,rtx3060,cpu:64GiB")
    plan = vramancer.plan("llama-3.1-70b", devices=devices, context=16384, dtype="q4_k_m")
    model = vramancer.load("./my-model", devices="auto")        # needs torch + transformers
    with vramancer.track(interval=0.1) as rec: ...

Importing this package never imports torch; ``load`` and ``track`` import what they need.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .devices.device import Device
from .errors import (
    BadInputError,
    CheckpointMismatchError,
    DeviceOutOfMemoryError,
    DeviceSpecError,
    DoesNotFitError,
    MalformedCheckpointError,
    TraceFileError,
    UnknownModelError,
    VramancerError,
    WorkloadError,
)
from .models.profile import BlockProfile, ModelProfile
from .plan.plan import Plan, Stage, Workload

if TYPE_CHECKING:  # pragma: no cover
    from .telemetry.recorder import Recorder

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "parse_devices",
    "profile",
    "plan",
    "load",
    "load_pipeline",
    "track",
    "Device",
    "ModelProfile",
    "BlockProfile",
    "Plan",
    "Stage",
    "Workload",
    "VramancerError",
    "BadInputError",
    "UnknownModelError",
    "MalformedCheckpointError",
    "DeviceSpecError",
    "WorkloadError",
    "DoesNotFitError",
    "CheckpointMismatchError",
    "DeviceOutOfMemoryError",
    "TraceFileError",
]


def parse_devices(spec: str | list | None = "auto") -> list[Device]:
    """Devices from a spec string ("rtx3090,rtx3060:10GiB,cpu:64GiB", "auto", "cuda:0")."""
    from .devices.spec import parse_devices as _parse

    return _parse(spec)


def profile(model: Any, dtype: str | None = None) -> ModelProfile:
    """What ``model`` needs, per block, without loading weights. ``model``: local folder,
    .safetensors / .gguf file, HF id in the local cache, catalog name, or nn.Module."""
    from .models.resolve import profile as _profile

    return _profile(model, dtype=dtype)


def plan(model: Any, devices: Any = "auto", context: int | None = None, batch: int = 1,
         dtype: str | None = None, objective: str = "latency", split: list[float] | None = None,
         reserve_bytes: int | str | None = None, prefill_chunk: int = 512, kv_dtype: str | None = None,
         backing: str = "cpu") -> Plan:
    """Plan the split of ``model`` over ``devices`` (a pure function: nothing is loaded). ``context``
    None: 4096 tokens, or the model's trained maximum when that is smaller. ``kv_dtype``: how the KV
    cache is stored (``--kv-dtype``: q8_0, fp8, bf16, f16, f32; None: the compute dtype).
    ``backing``: the host device the disk tier streams through (``--backing``)."""
    from .plan.planner import plan as _plan

    return _plan(model, devices=devices, context=context, batch=batch, dtype=dtype,
                 objective=objective, split=split, reserve_bytes=reserve_bytes,
                 prefill_chunk=prefill_chunk, kv_dtype=kv_dtype, backing=backing)


def load(model: Any, devices: Any = "auto", plan: Plan | None = None, **plan_kwargs: Any) -> Any:
    """Load ``model`` split over ``devices`` following ``plan`` (made here when not given);
    returns the model, ready for ``model(...)`` and ``.generate(...)``."""
    from .runtime.loader import load as _load

    return _load(model, devices=devices, plan=plan, **plan_kwargs)


def load_pipeline(model: Any, devices: Any = "auto", height: int = 1024, width: int = 1024,
                  plan: Plan | None = None, **kwargs: Any) -> Any:
    """Load a diffusers pipeline (folder with model_index.json, or a single-file checkpoint with
    ``config=``) with its components placed by ``plan`` (made here for ``devices`` and the image size
    when not given) and its denoiser split over its stages; use it as diffusers users do:
    ``pipe(prompt, num_inference_steps=..., generator=...)``. See vramancer.runtime.pipeline."""
    from .runtime.pipeline import load_pipeline as _load_pipeline

    return _load_pipeline(model, devices=devices, height=height, width=width, plan=plan, **kwargs)


def track(interval: float = 1.0, **kwargs: Any) -> Recorder:
    """A Recorder of VRAM samples; use as ``with vramancer.track(0.1) as rec:``."""
    from .telemetry.recorder import track as _track

    return _track(interval=interval, **kwargs)
