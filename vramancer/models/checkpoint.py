"""Profiles from safetensors checkpoints: a transformers model folder (config.json +
model.safetensors or a sharded model.safetensors.index.json), or one .safetensors file.

Weight bytes are exact: each tensor's bytes come from its safetensors header (numel x the bits of
its stored dtype), read by ``read_safetensors_header`` (header only, no tensor data). That one
reader also serves the runtime, which needs each tensor's file offset: ``safetensors.safe_open``
has no API that gives it, and the format is an 8-byte little-endian length and a JSON header. Tensors are
placed into the blocks of the architecture's layout by name (see ``place_tensors``). When the
requested dtype differs from the checkpoint's, every tensor is sized from its shape in the
requested dtype instead. No torch import.
"""
from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, MalformedCheckpointError, UnknownModelError, VramancerError
from .arch import config_dtype, config_errors, config_quantization, layout_from_config
from .dtypes import resolve_dtype
from .layout import ArchLayout, BlockLayout, TensorSpec, assemble_profile
from .prequant import held_tensors
from .profile import ModelProfile

__all__ = [
    "HeaderTensor",
    "SAFETENSORS_BITS",
    "read_config",
    "read_safetensors_header",
    "checkpoint_files",
    "checkpoint_dtype",
    "layout_for_config",
    "layout_from_tensor_names",
    "place_tensors",
    "profile_from_folder",
    "profile_from_safetensors_file",
    "profile_from_tensors",
    "SAFETENSORS_TORCH_NAMES",
    "IGNORED_TENSOR_PATTERNS",
    "ignored_tensor",
    "pickle_weight_files",
    "refuse_pickle_only",
]

# bits per element of each safetensors dtype
SAFETENSORS_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# safetensors dtype names -> torch dtype attribute names (the one table; the runtime and convert use it)
SAFETENSORS_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
_FLOAT_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_LAYER_RE = re.compile(r"(?:^|\.)(layers|h|layer|blocks|block|blk|decoder_layers)\.(\d+)\.")
_EMBED_RE = re.compile(r"(embed|wte\.|wpe\.|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings"
                       r"|token_embd|position_embd|token_types)")
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")

# Checkpoint tensors transformers does not load into the table's architectures, so never weights:
# its generic rules for buffers that used to be saved (``position_ids``, ``rotary_emb.inv_freq``;
# PreTrainedModel._adjust_missing_and_unexpected_keys) and the attention-mask buffers older GPT-2 /
# GPT-J / GPT-Neo / GPT-NeoX checkpoints hold (``attn.bias`` is in GPT-2's
# ``_keys_to_ignore_on_load_unexpected``; ``masked_bias`` is a buffer those classes no longer have).
# Only a tensor the architecture's layout does not name is tested against these.
IGNORED_TENSOR_PATTERNS: tuple[str, ...] = (
    r"(^|\.)position_ids$",
    r"rotary_emb\.(original_)?inv_freq$",
    r"(^|\.)(attn|attention)\.(bias|masked_bias)$",
)
_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in IGNORED_TENSOR_PATTERNS))


def ignored_tensor(name: str) -> bool:
    """Whether transformers leaves checkpoint tensor ``name`` unread (a legacy buffer, not a weight)."""
    return _IGNORED_RE.search(name) is not None


def pickle_weight_files(folder: str | Path) -> list[Path]:
    """The PyTorch pickle weights of a model folder (``pytorch_model.bin``, or the shards its
    ``pytorch_model.bin.index.json`` names, else every ``*.bin`` beside a config)."""
    folder = Path(folder)
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        data = read_config(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MalformedCheckpointError(f"malformed index {index}: no weight_map of tensor -> file")
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "pytorch_model.bin"
    if single.is_file():
        return [single]
    return sorted(p for p in folder.glob("*.bin") if p.is_file() and p.name != "training_args.bin")


def refuse_pickle_only(folder: str | Path, shown: str | None = None) -> None:
    """BadInputError when ``folder`` holds PyTorch pickle weights and no safetensors: the runtime
    never unpickles. The message is the one command that converts them."""
    folder = Path(folder)
    if checkpoint_files(folder)[0] or not pickle_weight_files(folder):
        return
    src = shown or str(folder)
    dst = f"{Path(src.rstrip('/')).name or 'model'}-safetensors"
    raise BadInputError(f"{src} has only PyTorch pickle weights (pytorch_model.bin), which are not loaded here; "
                        f"convert them once with: vramancer convert {src} {dst}")


@dataclass(frozen=True)
class HeaderTensor:
    """A tensor as a checkpoint header describes it; ``nbytes`` is its exact stored size and
    ``offset_bytes`` where its data starts in ``file`` (safetensors; 0 where unknown)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: str
    offset_bytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


_MAX_HEADER_BYTES = 100 * 2**20
_MAX_CONFIG_BYTES = 64 * 2**20


def read_config(path: str | Path) -> dict:
    """A config.json as a dict; MalformedCheckpointError naming the file when it cannot be read or
    is not a JSON object (vramancer._json: size, UTF-8, syntax and nesting checked)."""
    from .._json import read_json_file

    path = Path(path)
    config = read_json_file(path, error=MalformedCheckpointError, what="config", max_bytes=_MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise MalformedCheckpointError(f"malformed config {path}: not a JSON object")
    return config


def read_safetensors_header(path: str | Path) -> tuple[list[HeaderTensor], dict[str, str]]:
    """(tensors, metadata) of one .safetensors file, from its header only. Every entry is checked:
    a known dtype, offsets that match the shape, data that lies inside the file."""
    path = Path(path)
    bad = f"malformed safetensors file {path}"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO or device would block or never end
            raise MalformedCheckpointError(f"{bad}: not a regular file")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise MalformedCheckpointError(f"{bad}: too short for a header")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > _MAX_HEADER_BYTES:
                raise MalformedCheckpointError(f"{bad}: a header of {n} bytes is not plausible")
            if 8 + n > size:   # checked before reading: a huge length field never allocates
                raise MalformedCheckpointError(f"{bad}: its header of {n} bytes runs past the end of the "
                                               f"{size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise MalformedCheckpointError(f"cannot read safetensors file {path}: {e.strerror or e}") from None
    from .._json import parse_json

    if len(raw) != n:
        raise MalformedCheckpointError(f"{bad}: truncated header")
    header = parse_json(raw, error=MalformedCheckpointError, prefix=f"{bad}: the header: ")
    if not isinstance(header, dict):
        raise MalformedCheckpointError(f"{bad}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise MalformedCheckpointError(f"{bad}: __metadata__ is not a JSON object")
    base = 8 + n
    out: list[HeaderTensor] = []
    for name, meta in header.items():
        try:
            begin, end = (_header_int(x) for x in meta["data_offsets"])
            shape = tuple(_header_int(s) for s in meta["shape"])
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise MalformedCheckpointError(f"{bad}: bad header entry for {name!r}") from None
        if begin > end:
            raise MalformedCheckpointError(f"{bad}: tensor {name!r} ends before it begins")
        bits = SAFETENSORS_BITS.get(dtype)
        if bits is None:
            raise MalformedCheckpointError(f"{bad}: tensor {name!r} has unknown dtype {dtype!r}")
        t = HeaderTensor(name, shape, dtype, end - begin, str(path), base + begin)
        if t.nbytes != -(-t.numel * bits // 8):
            raise MalformedCheckpointError(f"{bad}: tensor {name!r} has {t.nbytes} bytes for shape {shape}")
        if begin < 0 or t.offset_bytes + t.nbytes > size:
            raise MalformedCheckpointError(f"{bad}: tensor {name!r} lies past the end of the file (truncated?)")
        out.append(t)
    spans = sorted((t.offset_bytes, t.offset_bytes + t.nbytes, t.name) for t in out if t.nbytes)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise MalformedCheckpointError(f"{bad}: tensors {a!r} and {b!r} overlap in the file")
    return out, {str(k): str(v) for k, v in metadata.items()}


def _header_int(x: object) -> int:
    """A non-negative JSON integer of a safetensors header (offsets, dimensions)."""
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(x)
    return x


def checkpoint_files(folder: str | Path) -> tuple[list[Path], list[str]]:
    """(the .safetensors files of a model folder, notes). With model.safetensors.index.json the
    shards it names; else model.safetensors; else every *.safetensors in the folder. Missing
    shards are left out and named in the notes."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    notes: list[str] = []
    if index.is_file():
        data = read_config(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MalformedCheckpointError(f"malformed safetensors index {index}: no weight_map of tensor -> file")
        shards = sorted(set(weight_map.values()))
        present = [folder / s for s in shards if (folder / s).is_file()]
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            notes.append(f"{len(missing)} of {len(shards)} shards missing ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''})")
        return present, notes
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], notes
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file()), notes


def checkpoint_dtype(tensors: list[HeaderTensor]) -> str | None:
    """The float dtype holding most of the >= 2-D weight bytes ("bfloat16", ...); None when most
    are stored otherwise (int8 / fp8 / packed int4: a pre-quantized checkpoint)."""
    by: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    if not by:
        for t in tensors:
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    if not by:
        return None
    top = max(by, key=lambda k: by[k])
    return _FLOAT_NAMES.get(top)


def layout_for_config(config: dict, origin: str) -> ArchLayout:
    """The architecture table's layout, or for a model_type outside it the meta-device fallback.
    Config values that are not sane sizes are a MalformedCheckpointError (arch.check_config_values)."""
    try:
        return layout_from_config(config, origin)
    except KeyError:
        from .module import layout_from_meta

        with config_errors(origin):
            return layout_from_meta(config, origin)


def _legacy_name(name: str) -> str:
    """transformers' "legacy" renaming of old checkpoints (``LayerNorm.gamma`` / ``.beta``)."""
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def layout_from_tensor_names(tensors: list[HeaderTensor], config: dict | None = None,
                             model_type: str = "unknown", exact: bool = True) -> ArchLayout:
    """A layout from tensor names alone (no known architecture): the repeated layers are the
    ``<prefix>.<i>.`` group with the most indices; embedding-like names go to block 0, the rest
    after the layers. KV from ``config`` when there is one, else from the k / v projection shapes
    of the first layer."""
    groups: dict[str, set[int]] = {}
    for t in tensors:
        m = re.match(r"^(.*?)\.(\d+)\.", t.name)
        if m:
            groups.setdefault(m.group(1), set()).add(int(m.group(2)))
    notes = ["no known architecture: blocks inferred from tensor names"]
    prefix = max(groups, key=lambda p: (len(groups[p]), -len(p))) if groups else ""
    L = (max(groups[prefix]) + 1) if prefix else 0
    blocks = [BlockLayout("embed", [])] + [BlockLayout(f"{prefix}.{i}", [f"{prefix}.{i}"]) for i in range(L)] \
        + [BlockLayout("head", [])]
    vocab = 0
    for t in tensors:
        m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.", t.name) if prefix else None
        if m:
            b = int(m.group(1)) + 1
        elif _EMBED_RE.search(t.name):
            b = 0
        else:
            b = L + 1
        role = "vector" if len(t.shape) < 2 else ("embed" if b == 0 else "head" if b == L + 1 else "matrix")
        if b == 0 and len(t.shape) == 2:
            vocab = max(vocab, t.shape[0])
        blocks[b].tensors.append(TensorSpec(t.name, t.shape, role, t.nbytes if exact else None))
        mod = _module_of(t.name)
        if b in (0, L + 1) and mod not in blocks[b].modules:
            blocks[b].modules.append(mod)
    hidden = 0
    if config:
        from .module import attention_figures

        fig = attention_figures(config)
        hidden, vocab = fig["hidden"] or hidden, fig["vocab"] or vocab
        for i in range(L):
            b = blocks[i + 1]
            b.kv_elems_per_token = fig["kv_elems"]
            b.kv_window = fig["windows"][i] if i < len(fig["windows"]) else None
            b.score_heads, b.attn_flops_per_token_per_ctx = fig["heads"], fig["attn_flops"]
    elif L:
        first = blocks[1].tensors
        k = [t for t in first if re.search(r"(k_proj|\.key|\.wk|attn_k|to_k)\.weight$", t.name) and len(t.shape) == 2]
        v = [t for t in first if re.search(r"(v_proj|\.value|\.wv|attn_v|to_v)\.weight$", t.name) and len(t.shape) == 2]
        q = [t for t in first if re.search(r"(q_proj|\.query|\.wq|attn_q|to_q)\.weight$", t.name) and len(t.shape) == 2]
        if k and v:
            kv_elems = k[0].shape[0] + v[0].shape[0]
            q_dim = q[0].shape[0] if q else k[0].shape[0]
            heads = max(1, q_dim // 128)  # head_dim unknown without a config: assume 128
            for b in blocks[1:-1]:
                b.kv_elems_per_token = kv_elems
                b.score_heads, b.attn_flops_per_token_per_ctx = heads, 4.0 * q_dim
            notes.append("no config: KV from the k/v projection shapes, attention heads assumed of size 128")
        else:
            notes.append("no config and no separate k/v projections: KV cache unknown (0)")
    for b in blocks[1:-1]:
        outs = sum(t.shape[0] for t in b.tensors if len(t.shape) == 2)
        b.act_elems_per_token = outs + 2 * hidden
    blocks[0].act_elems_per_token = hidden
    blocks[-1].act_elems_per_token = hidden
    blocks[-1].logits_elems_per_token = vocab if any(t.role == "head" for t in blocks[-1].tensors) else 0
    if not hidden and vocab:
        emb = [t for t in blocks[0].tensors if t.role == "embed"]
        hidden = emb[0].shape[-1] if emb else 0
    return ArchLayout(model_type=model_type, kind="causal-lm", layers_prefix=prefix, blocks=blocks,
                      hidden_size=hidden, num_layers=L, vocab_size=vocab, config=config, notes=notes)


def place_tensors(layout: ArchLayout, tensors: list[HeaderTensor], exact: bool) -> ArchLayout:
    """``layout`` with its tensors replaced by a checkpoint's: each checkpoint tensor goes to the
    block whose layout names it (also with a base-model prefix added or removed, e.g. ``bert.``, and
    transformers' legacy ``LayerNorm.gamma`` / ``beta`` names), else to layer ``i`` when its name has
    ``layers.i.`` / ``h.i.`` / ``blk.i.`` (a conversion renames or merges it); anything else is
    left out, as transformers leaves it unread (legacy buffers, heads the class has not). The tied
    tensor is shared by block 0
    and the last block; a tied model's stored LM head is skipped (transformers ties it). ``exact``:
    keep each tensor's stored bytes; otherwise size from shape in the profile's dtype."""
    nblocks = len(layout.blocks)
    where: dict[str, tuple[int, TensorSpec]] = {}
    shared_where: dict[str, list[tuple[int, TensorSpec]]] = {}
    for i, b in enumerate(layout.blocks):
        for t in b.tensors:
            where[t.name] = (i, t)
        for t in b.shared:
            shared_where.setdefault(t.name, []).append((i, t))
    tops = sorted({n.split(".", 1)[0] + "." for n in list(where) + list(shared_where) if "." in n})
    tensors_out: list[list[TensorSpec]] = [[] for _ in range(nblocks)]
    shared_out: list[list[TensorSpec]] = [[] for _ in range(nblocks)]
    guessed: list[str] = []
    skipped: list[str] = []
    unread: list[str] = []
    L = layout.num_layers

    for ct in tensors:
        nbytes = ct.nbytes if exact else None
        name = _legacy_name(ct.name)
        candidates = [name]
        if "." in name:
            candidates.append(name.split(".", 1)[1])
        candidates += [top + name for top in tops]
        hit = next((c for c in candidates if c in where or c in shared_where), None)
        if hit is not None and hit in shared_where:
            for i, t in shared_where[hit]:
                shared_out[i].append(TensorSpec(t.name, ct.shape, t.role, nbytes))
            continue
        if hit is not None:
            i, t = where[hit]
            tensors_out[i].append(TensorSpec(ct.name, ct.shape, t.role, nbytes))
            continue
        if layout.tied_key and (ct.name in _HEAD_NAMES or ct.name == layout.head_name):
            skipped.append(ct.name)
            continue
        m = _LAYER_RE.search(ct.name)
        if ignored_tensor(ct.name) or not (m and int(m.group(2)) < L):
            # outside the repeated layers the layout names every tensor of the model: one it does not
            # name (a pre-training head, a pooler the class lacks) is left unread by transformers
            unread.append(ct.name)
            continue
        i = int(m.group(2)) + 1  # a layer's tensor under another name (a conversion merges or renames it)
        if len(ct.shape) < 2:
            role = "vector"
        elif ".experts." in ct.name or len(ct.shape) >= 3 or "_exps" in ct.name:
            role = "expert"
        elif ct.name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight")):
            role = "router"     # an MoE router (a dense MLP's is gate_proj)
        else:
            role = "matrix"
        guessed.append(ct.name)
        tensors_out[i].append(TensorSpec(ct.name, ct.shape, role, nbytes))
    out = layout.with_block_tensors(tensors_out, shared_out)
    if guessed:
        out.notes.append(f"{len(guessed)} checkpoint tensors placed by name pattern (e.g. {guessed[0]})")
    if skipped:
        out.notes.append(f"skipped {', '.join(skipped)}: the model ties it to the input embedding")
    if unread:
        out.notes.append(f"{len(unread)} checkpoint tensors are not weights of the model (transformers leaves "
                         f"them unread): {', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}")
    return out


def _checkpoint_layout(config: dict | None, origin: str, tensors: list[HeaderTensor], exact: bool) -> ArchLayout:
    """The config's layout filled with the checkpoint's tensors; from tensor names when there is
    no config or its architecture cannot be laid out here (unknown to transformers, no torch)."""
    if config is not None:
        try:
            return place_tensors(layout_for_config(config, origin), tensors, exact)
        except (UnknownModelError, VramancerError) as e:
            if isinstance(e, MalformedCheckpointError):
                raise
            with config_errors(origin):
                layout = layout_from_tensor_names(tensors, config, str(config.get("model_type")), exact)
            layout.notes.append(f"laid out from tensor names: {e}")
            return layout
    return layout_from_tensor_names(tensors, None, "unknown", exact)


def _choose_dtype(requested: str | None, tensors: list[HeaderTensor], config: dict | None,
                  notes: list[str]) -> tuple[str, bool, str | None]:
    """(dtype name, exact: keep stored bytes, quantization) for a checkpoint."""
    method, qdtype = config_quantization(config)
    native = checkpoint_dtype(tensors)
    if method is not None or native is None:
        # pre-quantized (bitsandbytes / GPTQ / AWQ / fp8 ...): it loads as stored
        quant = method or next((t.dtype for t in tensors if len(t.shape) >= 2), None)
        name = resolve_dtype(requested).name if requested else (qdtype or config_dtype(config) or "bfloat16")
        if requested:
            notes.append(f"a pre-quantized checkpoint ({quant}) loads as stored: weights are its stored bytes")
        return name, True, quant
    if requested is None or resolve_dtype(requested).name == native:
        return native, True, None
    dt = resolve_dtype(requested)
    notes.append(f"checkpoint stored in {native}: sized in the requested {dt.name}")
    return dt.name, False, (dt.name if dt.quantized else None)


def profile_from_folder(folder: str | Path, dtype: str | None = None, *, name: str | None = None,
                        source: str = "hf-folder") -> ModelProfile:
    """Profile of a transformers model folder. With safetensors: exact stored bytes (or the
    requested dtype's); with config.json only (or shards missing): sized from the config."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    files, notes = checkpoint_files(folder)
    if not cfg_path.is_file():
        if len(files) == 1:
            return profile_from_safetensors_file(files[0], dtype, name=name)
        # (a folder holding one .gguf file is read by resolve.profile: gguf_file builds on this module)
        raise UnknownModelError(f"no config.json in {folder} (and not one .safetensors or .gguf file to read)")
    config = read_config(cfg_path)
    if not config.get("model_type"):
        raise MalformedCheckpointError(f"malformed config {cfg_path}: no model_type")
    display = name or str(folder)
    if notes or not files:
        # sized from the config (shards missing, a config-only folder, or .bin weights)
        if not files:
            notes.append("no safetensors weights: sized from config.json")
        layout = layout_for_config(config, str(cfg_path))
        method, qdtype = config_quantization(config)
        dname = dtype or qdtype or config_dtype(config)
        if dname is None:
            dname = "float32"
            notes.append("config.json names no dtype: sized in float32, as transformers loads it")
        dt = resolve_dtype(dname)
        shown_source = "config" if not files and source == "hf-folder" else source
        return assemble_profile(layout, dt, name=display, source=shown_source, path=str(folder),
                                quantization=method if qdtype == dt.name else (dt.name if dt.quantized else None),
                                notes=notes)
    tensors: list[HeaderTensor] = []
    for f in files:
        tensors += read_safetensors_header(f)[0]
    return profile_from_tensors(config, tensors, dtype, name=display, source=source, path=str(folder),
                                origin=str(cfg_path), notes=notes)


def profile_from_tensors(config: dict, tensors: list[HeaderTensor], dtype: str | None = None, *, name: str,
                         source: str, path: str | None, origin: str, notes: list[str] | None = None) -> ModelProfile:
    """Profile of a checkpoint given its config and its tensors as headers describe them, wherever
    the headers came from (local files, or ranges read from a Hub repo's files)."""
    notes = list(notes or [])
    tensors = held_tensors(tensors, config)   # pre-quantized: the bytes loading keeps
    dname, exact, quant = _choose_dtype(dtype, tensors, config, notes)
    layout = _checkpoint_layout(config, origin, tensors, exact)
    return assemble_profile(layout, resolve_dtype(dname), name=name, source=source, path=path,
                            quantization=quant, notes=notes)


def _config_from_metadata(metadata: dict[str, str]) -> dict | None:
    for key in ("config", "config.json", "hf_config"):
        raw = metadata.get(key)
        if raw:
            from .._json import parse_json

            try:
                value = parse_json(raw, error=MalformedCheckpointError)
            except MalformedCheckpointError:
                continue
            if isinstance(value, dict) and value.get("model_type"):
                return value
    return None


def profile_from_safetensors_file(path: str | Path, dtype: str | None = None, *,
                                  name: str | None = None) -> ModelProfile:
    """Profile of one .safetensors file: config from its metadata or a config.json beside it;
    without one, blocks and KV inferred from tensor names and shapes."""
    path = Path(path)
    tensors, metadata = read_safetensors_header(path)
    config = _config_from_metadata(metadata)
    beside = path.parent / "config.json"
    if config is None and beside.is_file():
        c = read_config(beside)
        config = c if c.get("model_type") else None
    notes: list[str] = []
    tensors = held_tensors(tensors, config)
    dname, exact, quant = _choose_dtype(dtype, tensors, config, notes)
    layout = _checkpoint_layout(config, str(beside), tensors, exact)
    return assemble_profile(layout, resolve_dtype(dname), name=name or str(path), source="safetensors",
                            path=str(path), quantization=quant, notes=notes)
