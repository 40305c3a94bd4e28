"""A model name on the command line that may be a Hub id not on this machine yet.

``remote_fetch(name)`` is None for anything found locally (a path, an HF-cache snapshot holding
every shard, a catalog name) and otherwise the ``Fetch`` of the Hub repo: what a run downloads and
how much, and the model's exact profile read from its config and safetensors headers.
``ensure_local(name)`` downloads what is missing (saying what and how much first) and returns a
name the local resolver finds (the same HF id, now in the cache).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .remote import looks_like_repo_id, split_revision

if TYPE_CHECKING:  # pragma: no cover
    from .fetch import Fetch

__all__ = ["remote_fetch", "ensure_local", "local_snapshot_complete"]


def local_snapshot_complete(name: str) -> bool:
    """Whether ``org/name[@rev]`` is in the HF cache as a whole model: config.json and every
    safetensors shard, or (what the runtime then refuses with the convert command) every pickle
    shard, or a GGUF file. A snapshot holding some shards only (a stage's pull) is not."""
    from ..models.checkpoint import checkpoint_files, pickle_weight_files
    from ..models.resolve import find_in_hf_cache

    repo, rev = split_revision(name)
    snap = find_in_hf_cache(repo, rev)
    if snap is None:
        return False
    if any(snap.glob("*.gguf")):
        return True
    if not (snap / "config.json").is_file():
        return False
    files, notes = checkpoint_files(snap)
    if files:
        return not notes
    pickles = pickle_weight_files(snap)
    return bool(pickles) and all(p.is_file() for p in pickles)


def _in_catalog(name: str) -> bool:
    try:
        from ..models.catalog import find_model
    except ImportError:  # pragma: no cover
        return False
    return find_model(name) is not None


def remote_fetch(name: str, dtype: str | None = None, *, catalog_first: bool = True) -> Fetch | None:
    """The Hub fetch for ``name``, or None when it resolves on this machine: a path, a whole
    snapshot in the HF cache, or (``catalog_first``, for planning) a catalog entry's HF id."""
    if not looks_like_repo_id(name) or local_snapshot_complete(name) or (catalog_first and _in_catalog(name)):
        return None
    from .fetch import plan_fetch

    return plan_fetch(name, dtype=dtype)


def ensure_local(name: str, say: Callable[[str], None] | None = None) -> str:
    """``name`` itself when it resolves locally; else download the Hub model's run files into the
    HF cache (announcing files and total bytes first, on stderr by default) and return ``name``."""
    fetch = remote_fetch(name, catalog_first=False)  # a run needs the weights, catalog entry or not
    if fetch is None:
        return name
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"downloading {fetch.announce()}:")
    for line in fetch.listing():
        say(line)
    fetch.download()
    return name
