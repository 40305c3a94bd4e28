"""A model repository on the Hugging Face Hub (or any server speaking its file API at $HF_ENDPOINT),
seen through ``huggingface_hub``: its files with their sizes at one commit, which of them a run
needs (safetensors weights, config, tokenizer and generation files: never pickles, never the
README's images), the shards holding given tensors, and a profile read from the remote config and
the safetensors headers alone (``huggingface_hub`` reads each header with an HTTP range request).

$HF_ENDPOINT and $HF_HUB_CACHE are read when a function runs (``vramancer.envs``), not when
``huggingface_hub`` was imported, and passed to it explicitly.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import envs
from ..errors import BadInputError, MalformedCheckpointError, UnknownModelError, VramancerError
from ..units import format_bytes

__all__ = ["RUN_FILE_PATTERNS", "RepoFile", "RemoteRepo", "HubError", "looks_like_repo_id", "split_revision",
           "open_repo", "hub_errors", "download_files", "remote_text", "remote_json", "describe",
           "index_weight_map", "INDEX_NAME"]

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# what a run needs besides the weights: the model's config, its tokenizer in any of the formats
# transformers reads, its generation defaults and chat template
RUN_FILE_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json",
)
INDEX_NAME = "model.safetensors.index.json"


class HubError(VramancerError):
    """The Hub could not be reached or answered with an error (exit 1)."""


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` (optionally ``@revision``) that is not a path on this machine."""
    repo = text.partition("@")[0]
    if not _REPO_ID_RE.match(repo) or ".." in repo:
        return False
    try:
        return not Path(text).expanduser().exists()
    except (OSError, ValueError):  # not a usable path: still an id
        return True


def split_revision(text: str, revision: str | None = None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); an explicit ``revision`` wins."""
    repo, _, rev = text.partition("@")
    return repo, revision or rev or None


@contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line VramancerErrors."""
    from huggingface_hub import errors as hf

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        yield
    except hf.RevisionNotFoundError:
        raise UnknownModelError(f"{where}: no such revision on {envs.get('HF_ENDPOINT')}") from None
    except hf.GatedRepoError:
        raise BadInputError(f"{where} is gated: accept its terms on the Hub and log in (`hf auth login`)") from None
    except hf.RepositoryNotFoundError:
        raise UnknownModelError(f"{where}: no such model repository on {envs.get('HF_ENDPOINT')} "
                                "(or it is private: log in with `hf auth login`)") from None
    except hf.EntryNotFoundError as e:
        raise MalformedCheckpointError(f"{where}: a file the repo lists is missing ({_first_line(e)})") from None
    except hf.HfHubHTTPError as e:
        raise HubError(f"{where}: the Hub answered {_first_line(e)}") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled) as e:
        raise HubError(f"{where}: cannot reach {envs.get('HF_ENDPOINT')} ({_first_line(e)})") from None
    except OSError as e:  # connection refused / reset, DNS, a full disk
        raise HubError(f"{where}: {type(e).__name__}: {_first_line(e)}") from None
    except Exception as e:  # httpx transport errors are not OSErrors
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise HubError(f"{where}: cannot reach {envs.get('HF_ENDPOINT')} ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class RepoFile:
    path: str
    size_bytes: int


@dataclass(frozen=True)
class RemoteRepo:
    """One commit of a model repository and its files."""

    repo_id: str
    revision: str | None
    commit: str
    files: tuple[RepoFile, ...]

    @property
    def name(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def file(self, path: str) -> RepoFile | None:
        return next((f for f in self.files if f.path == path), None)

    def has_safetensors(self) -> bool:
        return any(f.path.endswith(".safetensors") for f in self.files)

    def has_pickles(self) -> bool:
        return any(f.path.endswith(".bin") and Path(f.path).name.startswith("pytorch_model") for f in self.files)

    def support_files(self) -> list[RepoFile]:
        """config, tokenizer and generation files (top level)."""
        return [f for f in self.files if "/" not in f.path
                and any(fnmatch.fnmatchcase(f.path, p) for p in RUN_FILE_PATTERNS)]

    def weight_files(self, index: dict | None) -> list[RepoFile]:
        """The safetensors files a run reads: the shards the index names, else model.safetensors,
        else every top-level .safetensors."""
        if index is not None:
            shards = sorted(set(index_weight_map(index, self.name).values()))
            missing = [s for s in shards if self.file(s) is None]
            if missing:
                raise MalformedCheckpointError(f"{self.name}: {INDEX_NAME} names shards the repo lacks: "
                                               f"{', '.join(missing[:3])}")
            return [f for s in shards if (f := self.file(s)) is not None]
        single = self.file("model.safetensors")
        if single is not None:
            return [single]
        return [f for f in self.files if "/" not in f.path and f.path.endswith(".safetensors")]

    def run_files(self, index: dict | None) -> list[RepoFile]:
        """Everything a run needs, support files first, then the weights (and the index)."""
        out = self.support_files()
        idx = self.file(INDEX_NAME)
        if index is not None and idx is not None:
            out.append(idx)
        return out + self.weight_files(index)


def index_weight_map(index: dict, where: str) -> dict[str, str]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MalformedCheckpointError(f"{where}: malformed {INDEX_NAME} (no weight_map of tensor -> file)")
    return {str(k): v for k, v in weight_map.items()}


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=envs.get("HF_ENDPOINT"), library_name="vramancer")


def open_repo(repo_id: str, revision: str | None = None) -> RemoteRepo:
    """The files (with sizes) of ``repo_id`` at ``revision`` (default branch when None)."""
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id:
        raise UnknownModelError(f"{repo_id!r} is not a Hub model id (org/name)")
    from huggingface_hub.hf_api import RepoFile as HfRepoFile

    api = _api()
    with hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision)
        commit = info.sha
        if not commit:
            raise HubError(f"{repo_id}: the Hub gave no commit for revision {revision or 'main'}")
        files = tuple(RepoFile(f.path, int(f.size or 0))
                      for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                      if isinstance(f, HfRepoFile))
    return RemoteRepo(repo_id, revision, commit, files)


def download_files(repo: RemoteRepo, paths: list[str], local_dir: str | Path | None = None) -> Path:
    """Download ``paths`` of ``repo`` at its commit with huggingface_hub (its progress bars; a
    transfer cut halfway resumes from the bytes already on disk, in this call or the next): into
    the HF cache ($HF_HUB_CACHE) or ``local_dir``. Returns the snapshot (or local) folder."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo.repo_id, repo.revision):
        folder = snapshot_download(repo.repo_id, revision=repo.commit, allow_patterns=list(paths),
                                   cache_dir=envs.get("HF_HUB_CACHE"), local_dir=local_dir,
                                   endpoint=envs.get("HF_ENDPOINT"), library_name="vramancer")
    if not local_dir:
        _write_ref(repo)
    return Path(folder)


def _write_ref(repo: RemoteRepo) -> None:
    """refs/<revision> -> commit, so the resolver finds the snapshot by ``org/name`` later
    (snapshot_download given a commit hash does not write refs/main)."""
    storage = Path(envs.get("HF_HUB_CACHE")) / ("models--" + repo.repo_id.replace("/", "--"))
    ref = storage / "refs" / (repo.revision or "main")
    if repo.revision and re.fullmatch(r"[0-9a-f]{40}", repo.revision):
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(ref.name + ".tmp")
    tmp.write_text(repo.commit)
    tmp.replace(ref)


def remote_text(repo: RemoteRepo, path: str) -> str:
    """A small file of the repo (config, index), downloaded into the HF cache and read."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo.repo_id, repo.revision):
        local = hf_hub_download(repo.repo_id, path, revision=repo.commit, cache_dir=envs.get("HF_HUB_CACHE"),
                                endpoint=envs.get("HF_ENDPOINT"), library_name="vramancer")
    try:
        return Path(local).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MalformedCheckpointError(f"{repo.name}: cannot read {path} ({e})") from None


def remote_json(repo: RemoteRepo, path: str) -> dict:
    from .._json import parse_json

    try:
        value = parse_json(remote_text(repo, path), error=MalformedCheckpointError)
    except MalformedCheckpointError as e:
        raise MalformedCheckpointError(f"{repo.name}: malformed {path}: {e}") from None
    if not isinstance(value, dict):
        raise MalformedCheckpointError(f"{repo.name}: malformed {path}: not a JSON object")
    return value


def describe(files: list[RepoFile]) -> str:
    """"3 files, 1.2 GiB" for a download announcement."""
    total = sum(f.size_bytes for f in files)
    return f"{len(files)} file{'s' if len(files) != 1 else ''}, {format_bytes(total)}"
