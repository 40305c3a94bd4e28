"""Which block of a model, and so which stage of a plan, each checkpoint tensor belongs to.

A tensor belongs to the block whose module prefix it lies under (the Plan's ``PlanBlock.modules``,
else the profile's block modules; the longest prefix wins, names matched with the base-model
prefix added or removed as transformers does). Tied tensors are used by more than one block: the
profile lists them as ``shared`` on every block that uses them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from ..models.profile import ModelProfile
    from ..plan.plan import Plan

__all__ = ["TensorOwners"]


def _check_identity(plan: Plan, config: dict | None, name: str) -> None:
    """A plan that carries its model's config digest is refused for a model with another config."""
    digest = getattr(getattr(plan, "identity", None), "config_sha256", None)
    if not digest or config is None:
        return
    try:
        from ..plan.plan import config_sha256
    except ImportError:  # pragma: no cover - a Plan without identities
        return
    if config_sha256(config) != digest:
        raise BadInputError(f"the plan was made for another model than {name} (its config differs)")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass
class TensorOwners:
    """Block and stage lookup for checkpoint tensor names under ``plan`` for model ``prof``."""

    prof: ModelProfile
    plan: Plan
    config: dict | None = None      # the model's config.json, checked against the plan's identity

    def __post_init__(self) -> None:
        _check_identity(self.plan, self.config, self.prof.name)
        if len(self.plan.blocks) != self.prof.num_blocks:
            raise BadInputError(f"the plan has {len(self.plan.blocks)} blocks but {self.prof.name} has "
                                f"{self.prof.num_blocks}: it was made for another model")
        modules: list[list[str]] = []
        for i, pb in enumerate(self.plan.blocks):
            modules.append(list(getattr(pb, "modules", ()) or ()) or list(self.prof.blocks[i].modules))
        self._tops = sorted({m.split(".", 1)[0] + "." for mods in modules for m in mods if "." in m})
        self._owners = sorted(((m, b) for b, mods in enumerate(modules) for m in mods), key=lambda x: -len(x[0]))
        self._shared: dict[str, set[int]] = {}
        for b, blk in enumerate(self.prof.blocks):
            for n in blk.shared:
                self._shared.setdefault(n, set()).add(b)

    def _candidates(self, name: str) -> list[str]:
        out = [name]
        if "." in name:
            out.append(name.split(".", 1)[1])
        return out + [top + name for top in self._tops]

    def block_of(self, name: str) -> int | None:
        """The block that owns tensor ``name``; None when it lies under no block's modules."""
        cands = self._candidates(name)
        return next((b for m, b in self._owners if any(_under(c, m) for c in cands)), None)

    def users_of(self, name: str) -> set[int]:
        """Every block that uses ``name``: its owner and, for a tied tensor, the blocks sharing it."""
        out = set()
        for c in self._candidates(name):
            out |= self._shared.get(c, set())
        owner = self.block_of(name)
        if owner is not None:
            out.add(owner)
        return out

    def stage_of_block(self, block: int) -> int:
        for i, st in enumerate(self.plan.stages):
            if st.blocks[0] <= block < st.blocks[1]:
                return i
        raise BadInputError(f"the plan places no stage on block {block}")

    def stage_of(self, name: str) -> int:
        """The stage whose shard holds ``name``: its owner block's (stage 0 for a tensor no block owns)."""
        owner = self.block_of(name)
        return 0 if owner is None else self.stage_of_block(owner)

    def needed_by(self, name: str, stages: set[int]) -> bool:
        """Whether any of ``stages`` loads ``name`` (a tensor no block owns is needed by all)."""
        users = self.users_of(name)
        if not users:
            return True
        return any(self.stage_of_block(b) in stages for b in users)

    def check_stages(self, stages: list[int]) -> None:
        for s in stages:
            if not 0 <= s < len(self.plan.stages):
                raise BadInputError(f"--stages: the plan has stages 0..{len(self.plan.stages) - 1}, not {s}")
