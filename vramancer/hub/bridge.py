"""The cloud bridge over a local checkpoint folder: which tensors a plan stage needs, and a
``BridgeServer`` (vramancer/link/bridge.py) that serves them from the folder's safetensors files.

    server = checkpoint_bridge("models/llama")                       # every tensor of the folder
    names = stage_names("models/llama", plan, [1])                   # what stage 1 loads
    tensors = fetch_tensors(dial, names, cache_dir=cache, device="cuda:0")   # on the worker
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInputError, MalformedCheckpointError, UnknownModelError
from ..link.bridge import CHUNK_BYTES, BridgeServer
from ..models.checkpoint import HeaderTensor, checkpoint_files, read_safetensors_header

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.plan import Plan

__all__ = ["checkpoint_tensors", "checkpoint_bridge", "stage_names"]


def checkpoint_tensors(folder: str | Path) -> dict[str, HeaderTensor]:
    """Every tensor of a safetensors checkpoint folder (sharded or not), from the headers only."""
    root = Path(folder)
    if not root.is_dir():
        raise UnknownModelError(f"{root}: no such folder")
    files, notes = checkpoint_files(root)
    if notes:
        raise MalformedCheckpointError(f"{root}: {notes[0]}")
    if not files:
        raise UnknownModelError(f"{root}: no .safetensors weights found")
    out: dict[str, HeaderTensor] = {}
    for f in files:
        out.update((t.name, t) for t in read_safetensors_header(f)[0])
    return out


def checkpoint_bridge(folder: str | Path, names: list[str] | None = None, *,
                      chunk_bytes: int = CHUNK_BYTES) -> BridgeServer:
    """A BridgeServer for the tensors of ``folder`` (only ``names`` when given)."""
    return BridgeServer(checkpoint_tensors(folder).values(), names, chunk_bytes=chunk_bytes)


def stage_names(folder: str | Path, plan: Plan, stages: list[int]) -> list[str]:
    """The checkpoint tensors (sorted) that ``stages`` of ``plan`` load, for the model in ``folder``
    (its config.json and safetensors headers; refused when the plan was made for another model)."""
    from ..models.checkpoint import profile_from_folder, read_config
    from .fetch import stage_tensor_names

    root = Path(folder)
    cfg = root / "config.json"
    if not cfg.is_file():
        raise BadInputError(f"{root}: stage names need the model's config.json beside its weights")
    names = list(checkpoint_tensors(root))
    prof = profile_from_folder(root, plan.workload.dtype)
    return sorted(stage_tensor_names(prof, plan, stages, names, read_config(cfg)))
