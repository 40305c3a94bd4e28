"""Stage boundaries: move activations and the inputs layers share (position embeddings, masks,
cache positions) to a stage's device when execution enters it, and nowhere else.

A ``BoundaryHook`` is a forward pre-hook on each unit module of a stage (a layer, the final norm, the
LM head). The stage's entry unit moves everything it receives and remembers each move; the other
units of the stage find the tensors they share with it (the same mask and position tensors the model
hands every layer) already moved, so each shared tensor crosses once per stage per forward. Where a
stage runs on the same torch device as the model's inputs, only the entry hook is installed and it
moves nothing: it counts the crossing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["BoundaryStats", "StageInputCache", "BoundaryHook", "move_tensors", "hidden_state_of"]


@dataclass
class BoundaryStats:
    """Per stage: forwards that entered it, bytes of hidden states that crossed into it (whatever the
    devices), and bytes physically copied between devices on entry (hidden states + shared inputs)."""

    crossings: int = 0
    hidden_bytes: int = 0
    copied_bytes: int = 0

    def to_dict(self) -> dict:
        return {"crossings": self.crossings, "hidden_bytes": self.hidden_bytes, "copied_bytes": self.copied_bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def move_tensors(obj: Any, device: torch.device, memo: dict[int, tuple[Any, Any]] | None = None,
                 stats: BoundaryStats | None = None) -> Any:
    """``obj`` with every tensor inside tuples / lists / dicts on ``device``. ``memo`` maps the id of a
    tensor already moved to (tensor, moved copy) so one tensor is copied once."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if memo is not None:
            hit = memo.get(id(obj))
            if hit is not None and hit[0] is obj:
                return hit[1]
        moved = obj.to(device, non_blocking=device.type == "cuda")
        if memo is not None:
            memo[id(obj)] = (obj, moved)
        if stats is not None:
            stats.copied_bytes += _nbytes(obj)
        return moved
    if isinstance(obj, tuple):
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(move_tensors(x, device, memo, stats) for x in obj))
        return tuple(move_tensors(x, device, memo, stats) for x in obj)
    if isinstance(obj, list):
        return [move_tensors(x, device, memo, stats) for x in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: move_tensors(v, device, memo, stats) for k, v in obj.items()}
    return obj


def hidden_state_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    import torch

    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


class StageInputCache:
    """The moves made on entry to one stage during the current forward (cleared at each entry)."""

    def __init__(self) -> None:
        self.memo: dict[int, tuple[Any, Any]] = {}

    def clear(self) -> None:
        self.memo.clear()


class BoundaryHook:
    """Forward pre-hook (``with_kwargs=True``) placing a unit's inputs on its stage's device."""

    def __init__(self, device: torch.device, cache: StageInputCache, stats: BoundaryStats, entry: bool,
                 move: bool):
        self.device = device
        self.cache = cache
        self.stats = stats
        self.entry = entry
        self.move = move

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.entry:
            self.cache.clear()
            self.stats.crossings += 1
            h = hidden_state_of(args, kwargs)
            if h is not None:
                self.stats.hidden_bytes += _nbytes(h)
        if not self.move:
            return None
        args = move_tensors(args, self.device, self.cache.memo, self.stats)
        kwargs = move_tensors(kwargs, self.device, self.cache.memo, self.stats)
        return args, kwargs
