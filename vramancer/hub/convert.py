"""``vramancer convert SRC DST``: any checkpoint people publish, as a safetensors folder VRAMancer
(and transformers) loads.

Sources:
  * a folder (or an HF id in the local cache) with ``pytorch_model.bin`` or sharded ``.bin`` +
    ``pytorch_model.bin.index.json``: read with ``torch.load(weights_only=True, mmap=True)`` only
    (no code runs from the pickle; tensors stay on disk until written). A file in the legacy
    pre-zip format cannot be memory-mapped and is read with ``weights_only=True`` alone;
  * a safetensors folder (to change the dtype or re-shard it);
  * a ``.gguf`` file (or a folder holding one): every tensor dequantised with the ``gguf``
    package's numpy ``dequantize``, names mapped to transformers' and tensors fixed up (Llama's
    q/k rows, GPT-2's transposes) by transformers' own GGUF loader tables, config.json from the
    GGUF metadata as transformers reads it, and its tokenizer as transformers builds it from the
    metadata. Dequantised weights are float32 unless ``--dtype``.

Output: tensors one at a time into shards (peak memory: one tensor, plus a GGUF MoE's merged
experts), ``--dtype`` casting floating tensors, shards of at most ``max_shard_bytes``, or with
``--plan`` one shard per plan stage (each holding the tensors its blocks own) and a
``model.safetensors.index.json``, so one machine of a split fetches only its stages' shards
(``vramancer pull --include-stage-of``). Tensors that share storage in a pickle (tied embeddings)
are written once, as ``save_pretrained`` does. config, tokenizer and generation files are copied
(config's dtype updated). Everything is written in a temporary folder beside DST and renamed to
DST at the end: DST is never half written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError, MalformedCheckpointError, UnknownModelError, WorkloadError
from ..models.checkpoint import (
    _HEAD_NAMES,
    SAFETENSORS_TORCH_NAMES,
    checkpoint_files,
    pickle_weight_files,
    read_config,
)
from .remote import RUN_FILE_PATTERNS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..plan.plan import Plan

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "ConvertResult", "convert", "source_kind"]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_TORCH_TO_ST = {v: k for k, v in SAFETENSORS_TORCH_NAMES.items()}
_FLOAT_OUT = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class _Spec:
    """One output tensor: its name, dtype and shape as written, and how to produce it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        import torch

        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ConvertResult:
    folder: Path
    source_kind: str                     # "pytorch" | "safetensors" | "gguf"
    shards: list[str]
    tensors: int
    weights_bytes: int
    dtype: str | None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# sources
def _resolve_src(src: str) -> Path:
    p = Path(src).expanduser()
    try:
        if p.exists():
            return p
    except (OSError, ValueError):  # a NUL byte, a name too long: not a path here
        pass
    from ..models.resolve import find_in_hf_cache

    repo, _, rev = src.partition("@")
    snap = find_in_hf_cache(repo, rev or None)
    if snap is not None:
        return snap
    raise UnknownModelError(f"convert: {src!r} is not a file or folder here, nor an HF id in the local cache "
                            f"(fetch it first with `hf download {src} --local-dir DIR`)")


def source_kind(path: Path) -> str:
    """"gguf" | "safetensors" | "pytorch" for a source path; BadInputError for anything else."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        if path.suffix.lower() == ".bin":
            return "pytorch"
        if path.suffix.lower() == ".safetensors":
            return "safetensors"
        raise BadInputError(f"convert: {path} is not a .bin, .safetensors or .gguf file")
    if checkpoint_files(path)[0]:
        return "safetensors"
    if pickle_weight_files(path):
        return "pytorch"
    if len(list(path.glob("*.gguf"))) == 1:
        return "gguf"
    raise BadInputError(f"convert: {path} holds no weights (pytorch_model*.bin, *.safetensors or one .gguf)")


class _Tensors:
    """The source's tensors: names, stored dtype and shape, read one at a time."""

    kind: str
    folder: Path | None                   # where config / tokenizer files are
    config: dict | None

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _PickleTensors(_Tensors):
    kind = "pytorch"

    def __init__(self, path: Path):
        self.folder = path if path.is_dir() else path.parent
        files = pickle_weight_files(path) if path.is_dir() else [path]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MalformedCheckpointError(f"convert: shards named by the index are missing: {', '.join(missing[:3])}")
        self.config = read_config(self.folder / "config.json") if (self.folder / "config.json").is_file() else None
        self.notes: list[str] = []
        self.state: dict[str, Any] = {}
        for f in files:
            self.state.update(self._load(f))

    def _load(self, f: Path) -> dict:
        import pickle

        import torch

        def load(mmap: bool) -> Any:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)

        try:
            try:
                sd = load(True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                sd = load(False)  # the legacy (pre-zip) format cannot be memory-mapped
                self.notes.append(f"{f.name} is in torch's legacy format: read without a memory map")
        except pickle.UnpicklingError as e:
            raise BadInputError(f"convert: {f} holds more than tensors and is refused (weights_only load: "
                                f"{str(e).splitlines()[0]})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise MalformedCheckpointError(f"convert: cannot read {f}: {str(e).splitlines()[0]}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
            raise MalformedCheckpointError(f"convert: {f} is not a state dict (name -> tensor)")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    def specs(self):
        # tensors sharing storage (tied weights) are written once; the head's name is the one dropped
        by_storage: dict[tuple, list[str]] = {}
        for name, t in self.state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            by_storage.setdefault(key, []).append(name)
        dropped = set()
        for names in by_storage.values():
            if len(names) > 1:
                keep = sorted(names, key=lambda n: (n in _HEAD_NAMES or n.endswith("lm_head.weight"), n))[0]
                dropped |= {n for n in names if n != keep}
        if dropped:
            self.notes.append(f"tied tensors written once: {', '.join(sorted(dropped))} share storage with another")
        return [(n, t.dtype, tuple(t.shape), (lambda t=t: t)) for n, t in self.state.items() if n not in dropped]

    def close(self) -> None:
        self.state.clear()


class _SafetensorsTensors(_Tensors):
    kind = "safetensors"

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.folder = path if path.is_dir() else path.parent
        files = [path] if path.is_file() else checkpoint_files(path)[0]
        cfg = self.folder / "config.json"
        self.config = read_config(cfg) if cfg.is_file() else None
        self._handles = []
        self._where: dict[str, Any] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own SafetensorError
                raise MalformedCheckpointError(f"convert: cannot read {f}: {str(e).splitlines()[0]}") from None
            self._handles.append(h)
            self._where.update(dict.fromkeys(h.keys(), h))  # noqa: SIM118 (a safe_open handle is not iterable)

    def specs(self):
        out = []
        for name, h in self._where.items():
            sl = h.get_slice(name)
            dtype = _torch_dtype(sl.get_dtype())
            out.append((name, dtype, tuple(sl.get_shape()), (lambda h=h, n=name: h.get_tensor(n))))
        return out

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()


class _GGUFTensors(_Tensors):
    """A GGUF file through transformers' GGUF tables: its config, its name map and tensor fix-ups."""

    kind = "gguf"

    def __init__(self, path: Path):
        if path.is_dir():
            path = next(iter(path.glob("*.gguf")))
        self.path = path
        self.folder = None
        try:
            from gguf import GGUFReader
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        except ImportError as e:
            raise BadInputError(f"convert: reading GGUF needs gguf and transformers ({e})") from None
        from ..models.gguf_file import read_gguf

        _, tensors = read_gguf(path)  # the header checked first: MalformedCheckpointError naming the file
        if {t.file for t in tensors} != {str(path)}:
            raise BadInputError(f"convert: {path} is split in parts; merge them first "
                                "(llama.cpp: llama-gguf-split --merge FIRST-PART OUT.gguf)")
        try:
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
            self.reader = GGUFReader(str(path))
        except Exception as e:  # transformers' GGUF tables raise assorted types for what they do not support
            raise BadInputError(f"convert: transformers cannot read GGUF {path}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None
        config = dict(parsed.get("config") or {})
        if not config.get("model_type"):
            raise MalformedCheckpointError(f"convert: GGUF {path} names no architecture transformers knows")
        self.gguf_config = config
        self.architecture = self._architecture()
        self.model, self.config = self._meta_model(config)

    def _architecture(self) -> str:
        from transformers.modeling_gguf_pytorch_utils import read_field

        arch = read_field(self.reader, "general.architecture")
        return str(arch[0]) if arch else ""

    def _meta_model(self, config: dict) -> tuple[Any, dict]:
        import torch
        import transformers

        kw = {k: v for k, v in config.items() if k != "model_type"}
        try:
            cfg = transformers.AutoConfig.for_model(config["model_type"], **kw)
        except (ValueError, KeyError, TypeError) as e:
            raise MalformedCheckpointError(f"convert: GGUF {self.path}: transformers cannot build its config "
                                           f"({str(e).splitlines()[0]})") from None
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
            except ValueError:
                model = transformers.AutoModel.from_config(cfg)
        cfg.architectures = [type(model).__name__]
        out = cfg.to_dict()
        out["model_type"] = cfg.model_type
        return model, out

    def save_tokenizer(self, folder: Path) -> list[str]:
        """The tokenizer in the GGUF metadata, as transformers builds it, saved into ``folder``."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # transformers raises many kinds for a GGUF without a usable tokenizer
            return [f"no tokenizer written: the GGUF's cannot be read by transformers "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
        tok.save_pretrained(str(folder))
        return []

    def _processor(self) -> tuple[Any, dict[str, str]]:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.gguf_config)
        return processor, get_gguf_hf_weights_map(self.model, processor)

    def _process(self, processor: Any, key_map: dict[str, str], index: int, parsed: dict) -> tuple[str | None, Any]:
        """(transformers name or None, array) of GGUF tensor ``index``: dequantised, then fixed up."""
        from gguf import dequantize

        t = self.reader.tensors[index]
        try:
            weights = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise BadInputError(f"convert: {self.path}: tensor {t.name} is in {t.tensor_type.name}, which the gguf "
                                "package cannot dequantise") from None
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=key_map, parsed_parameters=parsed)
        if result.name is None or result.name not in key_map:
            return None, None
        return key_map[result.name], result.weights

    def specs(self):
        import numpy as np
        import torch

        meta = self.model.state_dict()
        processor, key_map = self._processor()
        parsed: dict[str, Any] = {"tensors": {}, "config": self.gguf_config}
        shapes: dict[str, tuple[int, ...]] = {}
        source: dict[str, int] = {}
        for i in range(len(self.reader.tensors)):  # pass 1: names and shapes, one tensor at a time
            name, w = self._process(processor, key_map, i, parsed)
            if name is not None:
                shapes[name], source[name] = tuple(np.shape(w)), i
        merged = parsed["tensors"]  # what a processor merged across GGUF tensors (MoE experts): kept
        for name, w in merged.items():
            shapes[name] = tuple(np.shape(w))

        def produce(name: str) -> torch.Tensor:
            if name in merged:
                w = merged.pop(name)
            else:  # pass 2: this one tensor dequantised again
                _, w = self._process(processor, key_map, source[name], {"tensors": {}, "config": self.gguf_config})
            t = w if isinstance(w, torch.Tensor) else torch.from_numpy(np.array(w, order="C", copy=True))
            return t.reshape(shapes[name])

        out = []
        for name, shape in shapes.items():
            if name in meta and tuple(meta[name].shape) != shape:
                raise MalformedCheckpointError(f"convert: GGUF tensor for {name} has shape {list(shape)}, "
                                               f"the model {list(meta[name].shape)}")
            out.append((name, torch.float32, shape, (lambda n=name: produce(n))))
        return out


def _torch_dtype(st: str) -> torch.dtype:
    import torch

    name = SAFETENSORS_TORCH_NAMES.get(st)
    if name is None or not hasattr(torch, name):
        raise MalformedCheckpointError(f"convert: unsupported safetensors dtype {st}")
    return getattr(torch, name)


def _open(path: Path, kind: str) -> _Tensors:
    if kind == "pytorch":
        return _PickleTensors(path)
    if kind == "safetensors":
        return _SafetensorsTensors(path)
    return _GGUFTensors(path)


# ------------------------------------------------------------------------------------------------
# writing
def _write_shard(path: Path, specs: list[_Spec]) -> int:
    """One safetensors file written tensor by tensor (header first); returns its data bytes."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        st = _TORCH_TO_ST.get(str(s.dtype).replace("torch.", ""))
        if st is None:
            raise WorkloadError(f"convert: cannot store {s.name} as {s.dtype} in safetensors")
        header[s.name] = {"dtype": st, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            t = _cast(s.produce(), s.dtype).detach().to("cpu").contiguous()
            if tuple(t.shape) != s.shape:
                raise MalformedCheckpointError(f"convert: {s.name} came out as {list(t.shape)}, not {list(s.shape)}")
            raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            f.write(memoryview(raw.numpy()))
        f.flush()
        os.fsync(f.fileno())
    return offset


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _groups_by_size(specs: list[_Spec], max_bytes: int) -> list[list[_Spec]]:
    groups: list[list[_Spec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    return groups


def _groups_by_plan(specs: list[_Spec], plan: Plan, config: dict | None, src: Path,
                    dtype: str | None) -> list[list[_Spec]]:
    from ..models.resolve import profile
    from .stages import TensorOwners

    prof = profile(str(src), dtype=dtype) if config is not None else None
    if prof is None:
        raise BadInputError("convert --plan needs the model's config.json beside its weights")
    owners = TensorOwners(prof, plan, config)
    groups: list[list[_Spec]] = [[] for _ in plan.stages]
    for s in specs:
        groups[owners.stage_of(s.name)].append(s)
    return groups


def _support_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    import fnmatch

    return [p for p in sorted(folder.iterdir()) if p.is_file()
            and any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_FILE_PATTERNS) and p.name != "config.json"]


def _prepare_dst(dst: Path) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise BadInputError(f"convert: {dst} already exists; choose a new folder")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"convert: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"convert: {parent} is not writable")
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=parent))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None, plan: Plan | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert ``src`` (see the module docstring) into the new safetensors folder ``dst``."""
    from ..models.dtypes import resolve_dtype

    src_path = _resolve_src(os.fspath(src))
    kind = source_kind(src_path)
    dst_path = Path(dst).expanduser()
    if dtype is not None:
        d = resolve_dtype(dtype)
        if d.name not in _FLOAT_OUT:
            raise WorkloadError(f"convert --dtype: float32, float16 or bfloat16 (quantized types are planned, "
                                f"not written), not {d.name}")
        dtype = d.name
    elif plan is not None and resolve_dtype(plan.workload.dtype).name in _FLOAT_OUT:
        dtype = resolve_dtype(plan.workload.dtype).name
    if max_shard_bytes <= 0:
        raise WorkloadError("convert: the shard size must be positive")
    tmp = _prepare_dst(dst_path)
    tensors: _Tensors | None = None
    try:
        tensors = _open(src_path, kind)
        import torch

        out_dtype = getattr(torch, dtype) if dtype else None
        specs = []
        for name, stored, shape, produce in tensors.specs():
            want = out_dtype if (out_dtype is not None and stored.is_floating_point) else stored
            specs.append(_Spec(name, want, shape, produce))
        specs.sort(key=lambda s: _natural(s.name))
        if not specs:
            raise MalformedCheckpointError(f"convert: {src_path} holds no tensors")
        if plan is not None:
            cfg_src = src_path if kind != "gguf" else None
            if cfg_src is None:
                raise BadInputError("convert --plan: convert the GGUF first, then re-shard the folder by plan")
            groups = _groups_by_plan(specs, plan, tensors.config, cfg_src if cfg_src.is_dir() else cfg_src.parent,
                                     dtype)
        else:
            groups = _groups_by_size(specs, max_shard_bytes)
        n = len(groups)
        names = (["model.safetensors"] if n == 1 and plan is None else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map: dict[str, str] = {}
        total = 0
        for fname, group in zip(names, groups, strict=True):
            if log:
                log(f"writing {fname} ({len(group)} tensors)")
            total += _write_shard(tmp / fname, group)
            weight_map.update((s.name, fname) for s in group)
        if n > 1 or plan is not None:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = dict(tensors.config) if tensors.config is not None else None
        if config is not None:
            if dtype:
                keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
                for k in keys:
                    config[k] = dtype
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in _support_files(tensors.folder):
            shutil.copyfile(f, tmp / f.name)
        notes = list(getattr(tensors, "notes", []))
        if isinstance(tensors, _GGUFTensors):
            notes += tensors.save_tokenizer(tmp)
        if config is None:
            notes.append("no config.json beside the weights: copy the model's config.json into the folder to load it")
        tensors.close()
        tensors = None
        if dst_path.exists():  # an empty folder (checked above)
            dst_path.rmdir()
        os.replace(tmp, dst_path)
    except BaseException:
        if tensors is not None:
            tensors.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(dst_path, kind, list(names), len(specs), total, dtype, notes)
