"""Profiles from GGUF files (llama.cpp), read with the ``gguf`` package's GGUFReader: the header
only (the tensor data is memory-mapped, never read). Each tensor's ``n_bytes`` is exact for its
quantization type; the architecture's hyperparameters come from the KV metadata
(``<arch>.block_count``, ``<arch>.attention.head_count_kv``, ...). Blocks: ``token_embd`` is
block 0, ``blk.N.*`` block N+1, ``output_norm`` / ``output`` the last block (``token_embd`` shared
by both when the file has no ``output``, i.e. tied embeddings). A split file
(``*-00001-of-00003.gguf``) is read with all its parts. No torch import.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import MalformedCheckpointError
from .arch import arch_spec, layout_from_config
from .checkpoint import HeaderTensor, layout_from_tensor_names
from .dtypes import resolve_dtype
from .layout import ArchLayout, TensorSpec, assemble_profile
from .profile import ModelProfile

__all__ = ["GGUF_ARCHES", "GGUF_FILE_TYPES", "read_gguf", "gguf_config", "profile_from_gguf", "check_gguf_header"]

# GGUF general.architecture -> transformers model_type (llama.cpp's "llama" also carries
# Mistral, and Mixtral when it has experts)
GGUF_ARCHES: dict[str, str] = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
    "gemma3": "gemma3_text", "phi3": "phi3", "qwen2moe": "qwen2_moe", "gpt2": "gpt2", "gptneox": "gpt_neox",
    "bert": "bert",
}
# general.file_type names (gguf.LlamaFileType) -> our dtype names
GGUF_FILE_TYPES: dict[str, str] = {
    "ALL_F32": "float32", "MOSTLY_F16": "float16", "MOSTLY_BF16": "bfloat16", "MOSTLY_Q8_0": "q8_0",
    "MOSTLY_Q6_K": "q6_k", "MOSTLY_Q5_K_M": "q5_k_m", "MOSTLY_Q4_K_M": "q4_k_m", "MOSTLY_Q4_0": "q4_0",
    "MOSTLY_Q3_K_M": "q3_k_m", "MOSTLY_Q2_K": "q2_k",
}
# dominant tensor type (gguf.GGMLQuantizationType) -> our dtype names, when the file type is not set
_TENSOR_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "Q8_0": "q8_0", "Q6_K": "q6_k",
                 "Q5_K": "q5_k_m", "Q4_K": "q4_k_m", "Q4_0": "q4_0", "Q3_K": "q3_k_m", "Q2_K": "q2_k"}
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def _split_parts(path: Path) -> tuple[list[Path], list[str]]:
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path], []
    n = int(m.group("n"))
    parts = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    return [p for p in parts if p.is_file()], ([f"split GGUF parts missing: {', '.join(missing)}"] if missing else [])


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def check_gguf_header(path: str | Path) -> None:
    """Walk a GGUF header (magic, version, KV metadata, tensor infos) checking that every count and
    length fits in the file, before GGUFReader trusts them: a count of 2**40 array items or
    tensors in a small file is refused in one line instead of being looped over. A FIFO or device
    is refused (reading one would block or never end)."""
    import mmap
    import os
    import stat
    import struct

    p = Path(path)
    bad = f"malformed GGUF file {p}"
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            raise MalformedCheckpointError(f"{bad}: not a regular file")
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise MalformedCheckpointError(f"{bad}: too short for a GGUF header")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise MalformedCheckpointError(f"cannot read GGUF file {p}: {e.strerror or e}") from None
    try:
        if buf[:4] != b"GGUF":
            raise MalformedCheckpointError(f"{bad}: no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise MalformedCheckpointError(f"{bad}: GGUF version {version} (2 and 3 are read)")
        pos = 24

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise MalformedCheckpointError(f"{bad}: {what} runs past the end of the file (truncated?)")
            start, pos = pos, pos + n
            return start

        def u32(what: str) -> int:
            return struct.unpack_from("<I", buf, take(4, what))[0]

        def u64(what: str) -> int:
            return struct.unpack_from("<Q", buf, take(8, what))[0]

        def string(what: str) -> None:
            take(u64(what), what)

        def value(vtype: int, what: str, depth: int = 0) -> None:
            if vtype in _GGUF_SCALAR_BYTES:
                take(_GGUF_SCALAR_BYTES[vtype], what)
            elif vtype == _GGUF_STRING:
                string(what)
            elif vtype == _GGUF_ARRAY:
                if depth > 4:
                    raise MalformedCheckpointError(f"{bad}: {what}: arrays nested too deeply")
                itype, count = u32(what), u64(what)
                if itype in _GGUF_SCALAR_BYTES:
                    take(count * _GGUF_SCALAR_BYTES[itype], what)
                elif count > size - pos:           # every item takes at least one byte
                    raise MalformedCheckpointError(f"{bad}: {what}: {count} items cannot fit in the file")
                else:
                    for _ in range(count):
                        value(itype, what, depth + 1)
            else:
                raise MalformedCheckpointError(f"{bad}: {what}: unknown value type {vtype}")

        if n_kv > size // 12 or n_tensors > size // 24:
            raise MalformedCheckpointError(f"{bad}: {n_kv} metadata entries and {n_tensors} tensors cannot fit "
                                           f"in {size} bytes")
        for i in range(n_kv):
            string(f"metadata key {i}")
            value(u32(f"metadata {i}"), f"metadata {i}")
        for i in range(n_tensors):
            string(f"tensor {i} name")
            n_dims = u32(f"tensor {i}")
            if n_dims > 8:
                raise MalformedCheckpointError(f"{bad}: tensor {i} has {n_dims} dimensions")
            take(8 * n_dims + 4 + 8, f"tensor {i}")
    except struct.error:
        raise MalformedCheckpointError(f"{bad}: truncated header") from None
    finally:
        buf.close()


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[HeaderTensor]]:
    """(KV metadata as plain values, tensors in transformers shape order with exact n_bytes) of a
    GGUF file and its split parts. MalformedCheckpointError names the file on a bad header."""
    from gguf import GGUFReader

    path = Path(path)
    parts, _ = _split_parts(path)
    fields: dict[str, Any] = {}
    tensors: list[HeaderTensor] = []
    for part in parts:
        check_gguf_header(part)
        try:
            reader = GGUFReader(str(part), "r")
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key in fields:
                    continue
                if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.tokens",):
                    continue
                fields[key] = field.contents()
            for t in reader.tensors:
                shape = tuple(int(s) for s in reversed(list(t.shape)))  # ggml lists ne0 (fastest) first
                tensors.append(HeaderTensor(str(t.name), shape, t.tensor_type.name, int(t.n_bytes), str(part)))
        except MalformedCheckpointError:
            raise
        except OSError as e:
            raise MalformedCheckpointError(f"cannot read GGUF file {part}: {e.strerror or e}") from None
        except Exception as e:  # GGUFReader raises ValueError, IndexError, struct errors, ... on bad bytes
            raise MalformedCheckpointError(f"malformed GGUF file {part}: {type(e).__name__}: {e}") from None
    if "general.architecture" not in fields:
        raise MalformedCheckpointError(f"malformed GGUF file {path}: no general.architecture")
    return fields, tensors


def gguf_config(fields: dict[str, Any], tensors: list[HeaderTensor]) -> dict:
    """A transformers-style config dict from GGUF metadata (model_type mapped when we know the
    architecture, else the GGUF name)."""
    arch = str(fields["general.architecture"])

    def f(key: str, default: Any = None) -> Any:
        v = fields.get(f"{arch}.{key}", default)
        if isinstance(v, list):  # per-layer arrays (e.g. feed_forward_length): the largest
            v = max(v) if v else default
        return v

    names = {t.name: t for t in tensors}
    embd = names.get("token_embd.weight")
    vocab = f("vocab_size") or (embd.shape[0] if embd else None) or len(fields.get("tokenizer.ggml.tokens") or [])
    heads = f("attention.head_count")
    hidden = f("embedding_length")
    experts = f("expert_count") or 0
    model_type = GGUF_ARCHES.get(arch, arch)
    if arch == "llama" and experts:
        model_type = "mixtral"
    cfg: dict[str, Any] = {
        "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": f("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": f("attention.head_count_kv", heads),
        "intermediate_size": f("feed_forward_length"), "vocab_size": vocab,
        "max_position_embeddings": f("context_length"), "tie_word_embeddings": "output.weight" not in names,
        "sliding_window": f("attention.sliding_window"),
    }
    if f("attention.key_length"):
        cfg["head_dim"] = f("attention.key_length")
    if f("rope.freq_base") is not None:
        cfg["rope_theta"] = f("rope.freq_base")
    if f("attention.layer_norm_rms_epsilon") is not None:
        cfg["rms_norm_eps"] = f("attention.layer_norm_rms_epsilon")
    if model_type == "mixtral":
        cfg.update(num_local_experts=experts, num_experts_per_tok=f("expert_used_count"))
    if model_type == "qwen2_moe":
        cfg.update(num_experts=experts, num_experts_per_tok=f("expert_used_count"),
                   moe_intermediate_size=f("expert_feed_forward_length"),
                   shared_expert_intermediate_size=f("expert_shared_feed_forward_length"))
    if model_type in ("qwen2", "qwen3", "qwen2_moe") and cfg["sliding_window"]:
        cfg["use_sliding_window"] = True
        cfg["max_window_layers"] = 0
    if model_type == "gpt2":
        cfg.update(n_embd=hidden, n_layer=cfg["num_hidden_layers"], n_head=heads,
                   n_positions=cfg["max_position_embeddings"], n_inner=cfg["intermediate_size"])
    if model_type == "bert":
        cfg["type_vocab_size"] = names["token_types.weight"].shape[0] if "token_types.weight" in names else 2
    return {k: v for k, v in cfg.items() if v is not None}


def _place(layout: ArchLayout, tensors: list[HeaderTensor], exact: bool) -> ArchLayout:
    n = len(layout.blocks)
    own: list[list[TensorSpec]] = [[] for _ in range(n)]
    shared: list[list[TensorSpec]] = [[] for _ in range(n)]
    L = layout.num_layers
    for t in tensors:
        nbytes = t.nbytes if exact else None
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if t.name == "token_embd.weight":
            if layout.tied_key:
                shared[0].append(TensorSpec(t.name, t.shape, "embed", nbytes))
                shared[-1].append(TensorSpec(t.name, t.shape, "head", nbytes))
            else:
                own[0].append(TensorSpec(t.name, t.shape, "embed", nbytes))
            continue
        if m and int(m.group(1)) < L:
            i = int(m.group(1)) + 1
        elif re.match(r"^(token_types|position_embd|token_embd_norm)\.", t.name):
            i = 0
        else:
            i = n - 1
        if len(t.shape) < 2:
            role = "vector"
        elif "_exps" in t.name:
            role = "expert"
        elif t.name == "output.weight":
            role = "head"
        elif i == 0:
            role = "embed" if not t.name.startswith("token_embd_norm") else "vector"
        else:
            role = "matrix"
        own[i].append(TensorSpec(t.name, t.shape, role, nbytes))
    out = layout.with_block_tensors(own, shared)
    # GGUF tensors are named blk.N.*, but a runtime that loads the file through transformers
    # (gguf_file=...) sees the transformers modules: keep those in ``modules``.
    return out


def _file_dtype(fields: dict[str, Any], tensors: list[HeaderTensor]) -> tuple[str, str | None]:
    """(our dtype name, GGUF quantization name) of the file."""
    from gguf import LlamaFileType

    quant = None
    ft = fields.get("general.file_type")
    if ft is not None:
        try:
            quant = LlamaFileType(int(ft)).name
        except ValueError:
            quant = f"file_type {ft}"
        if quant in GGUF_FILE_TYPES:
            return GGUF_FILE_TYPES[quant], quant
    by: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    top = max(by, key=lambda k: by[k]) if by else "F16"
    return _TENSOR_TYPES.get(top, "float16"), quant or top


def profile_from_gguf(path: str | Path, dtype: str | None = None, *, name: str | None = None) -> ModelProfile:
    """Profile of a GGUF file: exact bytes per tensor as quantized in the file (or sized in the
    requested dtype when it differs from the file's). The KV cache is sized in float16, llama.cpp's
    default cache type."""
    path = Path(path)
    _, notes = _split_parts(path)
    fields, tensors = read_gguf(path)
    config = gguf_config(fields, tensors)
    file_dtype, quant = _file_dtype(fields, tensors)
    exact = dtype is None or resolve_dtype(dtype).name == file_dtype
    dname = file_dtype if dtype is None else resolve_dtype(dtype).name
    if not exact:
        notes.append(f"file stored as {quant}: sized in the requested {dname}")
    spec = arch_spec(config.get("model_type"))
    layout: ArchLayout | None = None
    if spec is not None:
        try:
            layout = _place(layout_from_config(config, str(path)), tensors, exact)
        except MalformedCheckpointError:
            layout = None
    if layout is None:
        layout = layout_from_tensor_names(tensors, config, str(config.get("model_type")), exact)
    layout.config = config
    if file_dtype in ("float16", "bfloat16", "float32") and not quant:
        quant = None
    prof = assemble_profile(layout, resolve_dtype(dname), name=name or str(path), source="gguf", path=str(path),
                            kv_dtype=resolve_dtype("float16"), quantization=quant if exact else
                            (dname if resolve_dtype(dname).quantized else None), notes=notes)
    if exact:   # the runtime keeps the file's tensors and dequantizes each weight as a layer reads it
        for block, values in zip(prof.blocks, _dequant_bytes(tensors, len(prof.blocks), layout.num_layers,
                                                             bool(layout.tied_key))):
            block.dequant_bytes = values
    return prof


# bytes per value of a weight dequantized as a layer reads it (runtime/gguf/modules.py GGUFWeight): GGUF
# blocks -> float32 values, then their cast to the compute dtype (bfloat16 when a GPU computes: 4 + 2);
# F16/BF16 -> one copy in float32 or the compute dtype (4 at most); F32 -> its cast to bfloat16 (2).
# A CPU-only plan computes in float32 and needs 4 of the 6: the plan keeps the difference spare.
_DEQUANT_VALUE_BYTES = {"F32": 2, "F16": 4, "BF16": 4}
_QUANT_VALUE_BYTES = 6


def _dequant_bytes(tensors: list[HeaderTensor], n_blocks: int, num_layers: int, tied: bool) -> list[int]:
    """Per block, its largest weight dequantized (``_DEQUANT_VALUE_BYTES``): the block's matrices, its
    stacked experts (gate and up read as one ``gate_up_proj``: both), the LM head (the tied embedding
    table when tied; the embedding itself dequantizes only the rows of the ids it gets)."""
    out = [0] * n_blocks
    gate_up: dict[int, int] = {}
    for t in tensors:
        if len(t.shape) < 2:
            continue
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if t.name == "token_embd.weight":
            if not tied:
                continue
            i = n_blocks - 1
        elif m and int(m.group(1)) < num_layers:
            i = int(m.group(1)) + 1
        elif t.name == "output.weight":
            i = n_blocks - 1
        else:
            continue
        numel = 1
        for d in t.shape:
            numel *= d
        nbytes = numel * _DEQUANT_VALUE_BYTES.get(t.dtype, _QUANT_VALUE_BYTES)
        if re.search(r"\.ffn_(gate|up)_exps\.", t.name):
            gate_up[i] = gate_up.get(i, 0) + nbytes
            nbytes = gate_up[i]
        out[i] = max(out[i], nbytes)
    return out
