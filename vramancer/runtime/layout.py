"""Which stage owns each parameter and buffer: blocks (module-name prefixes, from the profile) mapped
onto the plan's stages.

A block is listed as transformers module prefixes (block 0 ``["model.embed_tokens",
"model.rotary_emb"]``, block i ``["model.layers.<i-1>"]``, the last ``["model.norm", "lm_head"]``).
A tensor belongs to the block whose prefix is the longest one that names it or one of its parents;
a tensor no prefix names (a buffer of a module the profile does not list) goes with block 0, which
runs first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..models.profile import ModelProfile
    from ..plan.plan import Plan

__all__ = ["BlockLayout", "StageLayout", "layout_from_profile", "stage_layout"]


@dataclass
class BlockLayout:
    """``modules[b]``: module name prefixes of block b, in the order they run.
    ``layers_prefix``: the ModuleList of repeated layers ("model.layers", "transformer.h")."""

    modules: list[list[str]]
    layers_prefix: str = ""

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
        if not self.layers_prefix:
            return None
        for p in self.modules[block]:
            m = re.fullmatch(re.escape(self.layers_prefix) + r"\.(\d+)", p)
            if m:
                return int(m.group(1))
        return None


def layout_from_profile(profile: "ModelProfile") -> BlockLayout:
    mods = [list(b.modules) for b in profile.blocks]
    if not all(mods):
        empty = [profile.blocks[i].name for i, m in enumerate(mods) if not m]
        raise BadInputError(f"profile of {profile.name} lists no modules for blocks {empty}; cannot load it")
    return BlockLayout(mods, profile.layers_prefix)


@dataclass
class StageLayout:
    """The plan's stages over a module: ``stage_of_block[b]``; tensors per stage, tied groups."""

    blocks: BlockLayout
    stage_of_block: list[int]
    tensor_stage: dict[str, int] = field(default_factory=dict)     # every param / buffer name (ties included)
    tied_groups: list[list[str]] = field(default_factory=list)    # names sharing one Parameter
    unowned: list[str] = field(default_factory=list)               # tensors no block lists (went to block 0)

    def stage_of(self, name: str) -> int:
        return self.tensor_stage[name]

    def block_modules(self, stage: int) -> list[tuple[int, str]]:
        """(block, module prefix) pairs of ``stage``, in run order."""
        return [(b, p) for b, s in enumerate(self.stage_of_block) if s == stage for p in self.blocks.modules[b]]


def stage_layout(model: "nn.Module", blocks: BlockLayout, plan: "Plan") -> StageLayout:
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
        by_id.setdefault(id(t), []).append(name)
    lay.tied_groups = [names for names in by_id.values() if len(names) > 1]
    return lay
