"""Which stage owns each parameter and buffer: the plan's blocks (module-name prefixes, which the
planner took from the model's profile) mapped onto the plan's stages.

A block is listed as transformers module prefixes (block 0 ``["model.embed_tokens",
"model.rotary_emb"]``, block i ``["model.layers.<i-1>"]``, the last ``["model.norm", "lm_head"]``).
A tensor belongs to the block whose prefix is the longest one that names it or one of its parents;
a tensor no prefix names (a buffer of a module the plan does not list) goes with block 0, which
runs first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..plan.plan import Plan

__all__ = ["BlockLayout", "StageLayout", "layout_from_plan", "stage_layout"]


@dataclass
class BlockLayout:
    """``modules[b]``: module name prefixes of block b, in the order they run; ``layers[b]``: the
    index of block b in the model's list of repeated layers (its KV cache layer), None if none."""

    modules: list[list[str]]
    layers: list[int | None]
    # block -> (the model's module name of its routed experts, plan host device id): MoE experts the
    # plan keeps in host RAM (runtime/experts.py)
    host_experts: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.modules)

    def block_of(self, name: str) -> int | None:
        """The block owning tensor or module ``name`` (longest matching prefix), None if none does."""
        best, best_len = None, -1
        for b, prefixes in enumerate(self.modules):
            for p in prefixes:
                if (p == "" or name == p or name.startswith(p + ".")) and len(p) > best_len:
                    best, best_len = b, len(p)
        return best

    def layer_index(self, block: int) -> int | None:
        """Index in the layers list of the repeated layer that block ``block`` is, else None."""
        return self.layers[block]


def layout_from_plan(plan: Plan, model: nn.Module) -> BlockLayout:
    """The plan's blocks, checked against ``model``: every module the plan names must exist in it.
    Refuses (BadInputError, one line) a plan that names no modules for a block (planned from a
    profile without module names) or modules the model does not have, MoE experts included."""
    mods = [list(b.modules) for b in plan.blocks]
    empty = [b.name for b, m in zip(plan.blocks, mods) if not m]
    if empty:
        raise BadInputError(f"the plan names no modules for blocks {empty[:4]}; plan again from the model folder "
                            "(vramancer plan FOLDER -o FILE)")
    for prefixes in mods:
        for p in prefixes:
            try:
                model.get_submodule(p)
            except AttributeError:
                raise BadInputError(f"the plan names module {p!r}, which {type(model).__name__} does not have; "
                                    "was the plan made for another model?") from None
    from .experts import host_experts_modules

    return BlockLayout(mods, [b.layer_index for b in plan.blocks], host_experts_modules(plan, model))


@dataclass
class StageLayout:
    """The plan's stages over a module: ``stage_of_block[b]``; tensors per stage, tied groups."""

    blocks: BlockLayout
    stage_of_block: list[int]
    tensor_stage: dict[str, int] = field(default_factory=dict)     # every param / buffer name (ties included)
    tied_groups: list[list[str]] = field(default_factory=list)    # names sharing one Parameter
    unowned: list[str] = field(default_factory=list)               # tensors no block lists (went to block 0)
    tensor_host: dict[str, str] = field(default_factory=dict)     # tensors of host experts -> plan host device

    def stage_of(self, name: str) -> int:
        return self.tensor_stage[name]

    def host_of(self, name: str) -> str | None:
        """The plan's host device holding tensor ``name`` (routed MoE experts in host RAM), else None."""
        return self.tensor_host.get(name)

    def block_modules(self, stage: int) -> list[tuple[int, str]]:
        """(block, module prefix) pairs of ``stage``, in run order."""
        return [(b, p) for b, s in enumerate(self.stage_of_block) if s == stage for p in self.blocks.modules[b]]


def stage_layout(model: nn.Module, blocks: BlockLayout, plan: Plan) -> StageLayout:
    n = blocks.num_blocks
    stage_of_block = [-1] * n
    for si, st in enumerate(plan.stages):
        lo, hi = st.blocks
        for b in range(lo, hi):
            if not 0 <= b < n:
                raise BadInputError(f"plan stage {si} names block {b}, but the model has {n} blocks")
            stage_of_block[b] = si
    if -1 in stage_of_block:
        raise BadInputError(f"plan leaves blocks {[b for b, s in enumerate(stage_of_block) if s < 0]} unplaced")
    lay = StageLayout(blocks, stage_of_block)
    by_id: dict[int, list[str]] = {}
    named: list[tuple[str, Any]] = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        b = blocks.block_of(name)
        if b is None:
            b = 0
            lay.unowned.append(name)
        lay.tensor_stage[name] = stage_of_block[b]
        ex = blocks.host_experts.get(b)
        if ex is not None and (name == ex[0] or name.startswith(ex[0] + ".")):
            lay.tensor_host[name] = ex[1]
        by_id.setdefault(id(t), []).append(name)
    lay.tied_groups = [names for names in by_id.values() if len(names) > 1]
    return lay
