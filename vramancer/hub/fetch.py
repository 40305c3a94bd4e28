"""What to download for a Hub model, and how much, before anything big is downloaded.

    fetch = plan_fetch("org/name")                       # config + index + safetensors headers only
    fetch.files, fetch.total_bytes, fetch.profile        # what a run would download; its exact profile
    fetch = plan_fetch("org/name", plan=p, stages=[0])   # only the shards holding stage 0's tensors
    folder = fetch.download()                            # huggingface_hub, resumable, its progress bars

The profile comes from the remote ``config.json`` and each shard's safetensors header (read by
``huggingface_hub`` with HTTP range requests), through the same placement as a local folder's, so
``vramancer plan org/name`` plans exactly what a run of the downloaded folder loads.

A stage's tensors are those under its blocks' module prefixes (the Plan's ``PlanBlock.modules``,
else the profile's) plus the tied tensors its blocks use; names are matched the way the profile
matches them (base-model prefix added or removed). Tensors under no block's modules (the rare
stray buffer) are fetched with every stage, so a stage never misses one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInputError, MalformedCheckpointError, UnknownModelError
from ..models.checkpoint import SAFETENSORS_BITS, HeaderTensor, profile_from_tensors
from .remote import (
    INDEX_NAME,
    RemoteRepo,
    RepoFile,
    describe,
    download_files,
    hub_errors,
    index_weight_map,
    open_repo,
    remote_json,
)
from .stages import TensorOwners

if TYPE_CHECKING:  # pragma: no cover
    from ..models.profile import ModelProfile
    from ..plan.plan import Plan

__all__ = ["Fetch", "RemoteModel", "plan_fetch", "remote_profile", "stage_tensor_names"]


@dataclass
class Fetch:
    """The files of ``repo`` to download (support files, index, weight shards) with their sizes."""

    repo: RemoteRepo
    files: list[RepoFile]
    profile: ModelProfile
    stages: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def weight_files(self) -> list[RepoFile]:
        return [f for f in self.files if f.path.endswith(".safetensors")]

    def announce(self) -> str:
        """One line: what will be fetched, and how much."""
        which = f" (stages {','.join(map(str, self.stages))})" if self.stages is not None else ""
        return f"{self.repo.name} @ {self.repo.commit[:12]}{which}: {describe(self.files)} to download"

    def listing(self) -> list[str]:
        from ..units import format_bytes

        return [f"  {f.path}  {format_bytes(f.size_bytes)}" for f in self.files]

    def download(self, local_dir: str | Path | None = None) -> Path:
        return download_files(self.repo, [f.path for f in self.files], local_dir=local_dir)


def _remote_tensors(repo: RemoteRepo, files: list[RepoFile]) -> list[HeaderTensor]:
    """Each shard's tensors from its header alone (a range request per shard)."""
    from huggingface_hub import HfApi

    from .. import envs

    api = HfApi(endpoint=envs.get("HF_ENDPOINT"), library_name="vramancer")
    out: list[HeaderTensor] = []
    for f in files:
        with hub_errors(repo.repo_id, repo.revision):
            try:
                meta = api.parse_safetensors_file_metadata(repo.repo_id, f.path, revision=repo.commit)
            except Exception as e:  # SafetensorsParsingError: a header that is not safetensors
                if type(e).__name__ == "SafetensorsParsingError":
                    raise MalformedCheckpointError(f"{repo.name}: {f.path} is not a safetensors file "
                                                   f"({str(e).splitlines()[0]})") from None
                raise
        for name, info in meta.tensors.items():
            shape = tuple(int(s) for s in info.shape)
            bits = SAFETENSORS_BITS.get(info.dtype)
            if bits is None:
                raise MalformedCheckpointError(f"{repo.name}: {f.path}: tensor {name!r} has unknown dtype "
                                               f"{info.dtype!r}")
            begin, end = (int(x) for x in info.data_offsets)
            out.append(HeaderTensor(name, shape, info.dtype, end - begin, f.path, begin))
    return out


@dataclass(frozen=True)
class RemoteModel:
    """A Hub model read without its weights: profile, config.json, safetensors index (or None)."""

    profile: ModelProfile
    config: dict
    index: dict | None


def remote_profile(repo: RemoteRepo, dtype: str | None = None) -> RemoteModel:
    """The profile of ``repo`` from its config and safetensors headers (with the config and index)."""
    if repo.file("config.json") is None:
        raise UnknownModelError(f"{repo.name}: no config.json in the repo (not a transformers model)")
    if not repo.has_safetensors():
        if repo.has_pickles():
            raise BadInputError(f"{repo.name} has only PyTorch pickle weights (pytorch_model.bin); download "
                                f"it with `hf download {repo.repo_id} --include '*.bin' '*.json' --local-dir DIR`, "
                                f"then: vramancer convert DIR {repo.repo_id.split('/')[-1]}-safetensors")
        raise UnknownModelError(f"{repo.name}: no safetensors weights in the repo")
    config = remote_json(repo, "config.json")
    if not config.get("model_type"):
        raise MalformedCheckpointError(f"{repo.name}: malformed config.json: no model_type")
    index = remote_json(repo, INDEX_NAME) if repo.file(INDEX_NAME) is not None else None
    weights = repo.weight_files(index)
    tensors = _remote_tensors(repo, weights)
    prof = profile_from_tensors(config, tensors, dtype, name=repo.name, source="hub", path=None,
                                origin=f"{repo.name}/config.json")
    return RemoteModel(prof, config, index)


def stage_tensor_names(prof: ModelProfile, plan: Plan, stages: list[int], names: list[str],
                       config: dict | None = None) -> set[str]:
    """Which of the checkpoint tensor ``names`` the ``stages`` of ``plan`` load (``config``: the
    model's, refused when the plan carries another model's identity)."""
    owners = TensorOwners(prof, plan, config)
    owners.check_stages(stages)
    wanted = set(stages)
    return {n for n in names if owners.needed_by(n, wanted)}


def plan_fetch(model: str, revision: str | None = None, *, dtype: str | None = None,
               plan: Plan | None = None, stages: list[int] | None = None) -> Fetch:
    """What to download for Hub model ``model`` (``org/name`` or ``org/name@rev``): every weight
    shard, or with ``plan`` only the shards holding the tensors of ``stages`` (all stages when
    None); always config, tokenizer and generation files."""
    from .remote import split_revision

    repo_id, rev = split_revision(model, revision)
    repo = open_repo(repo_id, rev)
    remote = remote_profile(repo, dtype or (plan.workload.dtype if plan is not None else None))
    prof, index = remote.profile, remote.index
    files = repo.run_files(index)
    notes: list[str] = []
    chosen = None
    if plan is not None:
        chosen = sorted(set(stages if stages is not None else range(len(plan.stages))))
        if index is None:
            notes.append("the repo has one safetensors file: every stage needs it")
        else:
            weight_map = index_weight_map(index, repo.name)
            needed = stage_tensor_names(prof, plan, chosen, list(weight_map), remote.config)
            shards = {weight_map[n] for n in needed}
            files = [f for f in files if not f.path.endswith(".safetensors") or f.path in shards]
    return Fetch(repo, files, prof, chosen, notes)
