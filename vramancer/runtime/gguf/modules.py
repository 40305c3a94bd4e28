"""Weights kept as their GGUF blocks inside a transformers model, dequantized where and when used.

Two pieces, both through public torch APIs, the transformers model code left as it is:

* ``GGUFWeight``, a parametrization (torch.nn.utils.parametrize): the module keeps the GGUF bytes
  (uint8 ``[..., bytes_per_row]``, or a float tensor in its stored dtype) as
  ``<module>.parametrizations.<name>.original``, and ``module.<name>`` is the float weight,
  dequantized on the stored tensor's device each time the module reads it. A Linear's weight lives
  dequantized only for the duration of its own forward, so resident memory is the GGUF byte count.
  Works for any parameter: linear layers, norms stored in another dtype, stacked experts.
* ``GGUFEmbedding``, which replaces an ``nn.Embedding`` (``model.set_submodule``): it gathers the
  rows of the ids it is given from the blocks (each row is whole blocks) and dequantizes only those,
  not the whole table.

Tied weights stay tied: the same uint8 Parameter can be the original of several parametrizations
and the table of an embedding.

On the CPU a weight is dequantized into a ``DequantScratch``, one per model: memory reused from
forward to forward (as llama.cpp's work buffer) instead of a fresh tensor each time, whose pages
Linux must fault in and zero again on every forward (glibc gives a large block back on free).
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from .dequant import GGUFType, _empty, dequantize, gguf_type

__all__ = ["GGUFWeight", "GGUFEmbedding", "DequantScratch", "keep_gguf", "stored_dtype", "stored_shape"]


def _storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (and storages) share ``t``'s memory now; None where torch does not say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else int(use_count(t.untyped_storage()._cdata))


def _aligned(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A new 1-D CPU tensor of ``n`` elements, 64-byte aligned (torch's allocator), on a page where
    large (dequant._empty: numpy's memory, huge pages; a large block from glibc starts 16 bytes past
    a page, and matrix products over weights that are not 64-byte aligned ran 10% slower)."""
    size = torch.empty((), dtype=dtype).element_size()
    return _empty((n * size,), torch.uint8, torch.device("cpu")).view(dtype)


class DequantScratch:
    """Host memory that dequantized weights are written into, one buffer per dtype, grown to the
    largest weight asked for and kept (the model's largest dequantized weight, after one forward).

    ``take(shape, dtype)`` returns a tensor over the buffer, or None when the buffer's memory is
    still used by anything else (torch's storage use count: a weight handed out earlier that is
    still referenced, a view of it such as one expert of a stacked tensor, a tensor autograd saved
    for backward): the caller then allocates a fresh tensor, so two weights alive at once never
    share memory. Thread-safe (the check and the new view are taken under a lock). Only on the CPU:
    on a GPU, torch's caching allocator already reuses memory without a page fault, and stream order
    would have to be tracked. Not copied with the model (a copy or unpickled model gets its own)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, tuple[torch.Tensor, int]] = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        return (DequantScratch, ())

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(b.numel() * b.element_size() for b, _ in self._bufs.values())

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        n = 1
        for s in shape:
            n *= int(s)
        with self._lock:
            held = self._bufs.get(dtype)
            if held is not None:
                buf, idle = held
                users = _storage_users(buf)
                if users is None or users > idle:
                    return None                # still in use: the caller takes fresh memory
                if buf.numel() >= n:
                    return buf[:n].view(shape)
            with torch.inference_mode(False):     # a normal tensor: written in and out of inference mode
                buf = _aligned(n, dtype)
            idle = _storage_users(buf)
            if idle is None:
                return None
            self._bufs[dtype] = (buf, idle)
            return buf[:n].view(shape)

    def clear(self) -> None:
        """Give the buffers back (they are made again on the next forward)."""
        with self._lock:
            self._bufs.clear()

_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(qtype: str | GGUFType) -> torch.dtype:
    """The torch dtype GGUF data of ``qtype`` is kept in: its float dtype, else uint8 blocks."""
    return _FLOAT.get(gguf_type(qtype).name, torch.uint8)


def stored_shape(qtype: str | GGUFType, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the stored tensor for a weight of ``shape``: rows of bytes for quantized types."""
    t = gguf_type(qtype)
    if not t.quantized:
        return tuple(shape)
    return (*shape[:-1], t.row_bytes(shape[-1]))


class GGUFWeight(nn.Module):
    """Parametrization: stored GGUF tensor -> float weight of ``shape`` in ``dtype``."""

    def __init__(self, qtype: str | GGUFType, shape: tuple[int, ...], dtype: torch.dtype,
                 scratch: DequantScratch | None = None):
        super().__init__()
        self.qtype = gguf_type(qtype)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.scratch = scratch

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        if self.scratch is not None and stored.device.type == "cpu" and stored.dtype != self.dtype:
            return self._into_scratch(stored, self.scratch)
        w = dequantize(stored, self.qtype) if stored.dtype == torch.uint8 else stored
        return w.reshape(self.shape).to(self.dtype)

    def _into_scratch(self, stored: torch.Tensor, scratch: DequantScratch) -> torch.Tensor:
        """The weight written into ``scratch`` (fresh memory where the scratch is in use)."""
        half = stored.dtype in (torch.float16, torch.bfloat16)
        if stored.dtype == torch.uint8 or (half and self.dtype == torch.float32):
            raw = stored if stored.dtype == torch.uint8 else stored.contiguous().view(torch.uint8)
            lead = tuple(raw.shape[:-1])
            values = raw.shape[-1] // self.qtype.block_bytes * self.qtype.block_values
            f32 = scratch.take((*lead, values), torch.float32)
            w = dequantize(raw, self.qtype, out=f32).reshape(self.shape)
        else:
            w = stored.reshape(self.shape)
        if w.dtype == self.dtype:
            return w
        out = scratch.take(self.shape, self.dtype)
        return w.to(self.dtype) if out is None else out.copy_(w)

    def extra_repr(self) -> str:
        return f"{self.qtype.name}, shape={list(self.shape)}, dtype={self.dtype}"


class GGUFEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table stays as GGUF data; ``weight`` is that stored tensor."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str | GGUFType, dtype: torch.dtype,
                 padding_idx: int | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.qtype = gguf_type(qtype)
        self.dtype = dtype
        if weight is None:
            weight = torch.empty(stored_shape(self.qtype, (num_embeddings, embedding_dim)),
                                 dtype=stored_dtype(self.qtype), device="meta")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self.weight.index_select(0, flat)
        out = dequantize(rows, self.qtype) if rows.dtype == torch.uint8 else rows
        return out.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype.name}, dtype={self.dtype}"


def keep_gguf(model: nn.Module, name: str, qtype: str | GGUFType, dtype: torch.dtype,
              stored: nn.Parameter | None = None,
              scratch: DequantScratch | None = None) -> tuple[str, nn.Parameter]:
    """Make parameter ``name`` of ``model`` (on meta) hold GGUF data of ``qtype`` for a weight of
    its shape, read back as ``dtype``: an ``nn.Embedding`` becomes a GGUFEmbedding, anything else
    gets a GGUFWeight parametrization. ``stored``: the Parameter to use as the stored tensor (to
    keep a tie), else a new one on meta. ``scratch``: where the weight is dequantized on the CPU
    (one for the whole model), else into fresh memory each time. Returns (the stored tensor's name
    in the model, it)."""
    from torch.nn.utils import parametrize

    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    meta = getattr(owner, attr)
    shape = tuple(meta.shape)
    t = gguf_type(qtype)
    if stored is None:
        stored = nn.Parameter(torch.empty(stored_shape(t, shape), dtype=stored_dtype(t), device="meta"),
                              requires_grad=False)
    if type(owner) is nn.Embedding and attr == "weight":
        emb = GGUFEmbedding(owner.num_embeddings, owner.embedding_dim, t, dtype, owner.padding_idx, weight=stored)
        model.set_submodule(path, emb)
        return name, stored
    setattr(owner, attr, stored)
    parametrize.register_parametrization(owner, attr, GGUFWeight(t, shape, dtype, scratch), unsafe=True)
    return f"{path + '.' if path else ''}parametrizations.{attr}.original", stored
