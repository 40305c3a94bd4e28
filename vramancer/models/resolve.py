"""``profile(model, dtype)``: the one entry point from anything a person names to a ModelProfile.

Resolution order:
  1. a ModelProfile is returned as it is; a torch ``nn.Module`` is counted from its parameters;
  2. an existing path: a model folder (config.json + safetensors, config.json alone, or one
     .safetensors / .gguf inside), a .safetensors file, a .gguf file, or a config.json file;
  3. an HF id (``org/name``) whose snapshot is in the local HF cache (no network);
  4. a catalog name (``vramancer plan --list-models``).
``dtype`` None means the checkpoint's dtype, else the config's (``dtype`` / ``torch_dtype``),
else the catalog's default. No torch import unless the model is a module or its architecture
is outside the table.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import BadInputError, MalformedCheckpointError, UnknownModelError
from .profile import ModelProfile

__all__ = ["profile", "find_in_hf_cache", "unknown_model_message"]

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def unknown_model_message(model: str) -> str:
    from .catalog import suggest_models

    close = suggest_models(model)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"unknown model {model!r}: not a local path, not in the HF cache, not in the catalog "
            f"({hint}see `vramancer plan --list-models`)")


def find_in_hf_cache(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The local snapshot folder of ``repo_id`` in the HF cache (``cache_dir``, else $HF_HUB_CACHE read
    now), or None; never uses the network. The layout is huggingface_hub's:
    ``models--org--name/refs/<revision>`` holds the commit, ``snapshots/<commit>/`` the files (symlinks
    into ``blobs/``). A snapshot is returned even when it holds only some files (a ``pull`` of some
    stages): what is missing is reported by whoever reads it."""
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id:
        return None
    if cache_dir is None:
        from .. import envs

        cache_dir = envs.get("HF_HUB_CACHE")
    storage = Path(cache_dir).expanduser() / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    if _COMMIT_RE.match(revision):
        commit = revision
    else:
        ref = storage / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _COMMIT_RE.match(commit):
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _is_module(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return False
    return any(cls.__module__.startswith("torch.nn") and cls.__name__ == "Module" for cls in type(model).__mro__)


def _profile_path(path: Path, dtype: str | None, name: str, source: str | None = None) -> ModelProfile:
    from .checkpoint import profile_from_folder, profile_from_safetensors_file

    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1 and not (path / "config.json").is_file() and len(list(path.glob("*.safetensors"))) != 1:
            from .gguf_file import profile_from_gguf

            return profile_from_gguf(ggufs[0], dtype, name=name)
        return profile_from_folder(path, dtype, name=name, **({"source": source} if source else {}))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return profile_from_safetensors_file(path, dtype, name=name)
    if suffix == ".gguf":
        from .gguf_file import profile_from_gguf

        return profile_from_gguf(path, dtype, name=name)
    if path.name == "model.safetensors.index.json" or path.name == "config.json":
        return profile_from_folder(path.parent, dtype, name=name)
    if suffix == ".json":
        return _profile_config_file(path, dtype, name)
    raise UnknownModelError(f"unsupported model file {str(path)!r}: expected a model folder, a .safetensors, "
                            f".gguf or config .json file")


def _profile_config_file(path: Path, dtype: str | None, name: str) -> ModelProfile:
    from .arch import config_dtype, config_quantization
    from .checkpoint import layout_for_config, read_config
    from .dtypes import resolve_dtype
    from .layout import assemble_profile

    config = read_config(path)
    if not config.get("model_type"):
        raise MalformedCheckpointError(f"malformed config {path}: no model_type")
    _, qdtype = config_quantization(config)
    dt = resolve_dtype(dtype or qdtype or config_dtype(config) or "float32")
    return assemble_profile(layout_for_config(config, str(path)), dt, name=name, source="config", path=str(path))


def _profile_catalog(name: str, dtype: str | None) -> ModelProfile | None:
    try:
        from .catalog import find_model
    except ImportError:
        return None
    entry = find_model(name)
    if entry is None:
        return None
    dtype = dtype or entry.default_dtype
    if entry.kind == "diffusion":
        from .diffusion import diffusion_profile

        return diffusion_profile(entry, dtype)
    from .arch import profile_from_config
    from .checkpoint import layout_for_config
    from .dtypes import resolve_dtype
    from .layout import assemble_profile

    config = entry.config_copy()
    try:
        prof = profile_from_config(config, dtype, name=entry.key, source="catalog")
    except KeyError:
        prof = assemble_profile(layout_for_config(config, f"catalog entry {entry.key}"), resolve_dtype(dtype),
                                name=entry.key, source="catalog")
    return prof


def profile(model: Any, dtype: str | None = None) -> ModelProfile:
    """What ``model`` needs, per block, without loading weights (see the module docstring).

    Raises UnknownModelError for a name found nowhere, MalformedCheckpointError (naming the file)
    for an unreadable config.json / safetensors / GGUF header, WorkloadError for an unknown dtype."""
    if dtype is not None:
        from .dtypes import resolve_dtype

        dtype = resolve_dtype(dtype).name
    if isinstance(model, ModelProfile):
        if dtype is None or dtype == model.dtype or model.source == "module":
            return model
        return profile(model.path or model.name, dtype)  # the same model in another dtype
    if _is_module(model):
        from .module import profile_from_module

        return profile_from_module(model, dtype)
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"cannot profile a {type(model).__name__}: pass a path, an HF id, a catalog name "
                            f"or a torch.nn.Module")
    text = os.fspath(model)
    if not text.strip():
        raise UnknownModelError(unknown_model_message(text))
    path = Path(text).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):   # a name too long for a path, a NUL byte: not a file, maybe a name
        exists = False
    if exists:
        return _profile_path(path, dtype, name=text)
    repo, _, revision = text.partition("@")
    snapshot = find_in_hf_cache(repo, revision or None)
    if snapshot is not None:
        return _profile_path(snapshot, dtype, name=text, source="hf-cache")
    prof = _profile_catalog(text, dtype)
    if prof is not None:
        return prof
    raise UnknownModelError(unknown_model_message(text))
