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
"""
from __future__ import annotations

import torch
from torch import nn

from .dequant import GGUFType, dequantize, gguf_type

__all__ = ["GGUFWeight", "GGUFEmbedding", "keep_gguf", "stored_dtype", "stored_shape"]

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

    def __init__(self, qtype: str | GGUFType, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.qtype = gguf_type(qtype)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        w = dequantize(stored, self.qtype) if stored.dtype == torch.uint8 else stored
        return w.reshape(self.shape).to(self.dtype)

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
              stored: nn.Parameter | None = None) -> tuple[str, nn.Parameter]:
    """Make parameter ``name`` of ``model`` (on meta) hold GGUF data of ``qtype`` for a weight of
    its shape, read back as ``dtype``: an ``nn.Embedding`` becomes a GGUFEmbedding, anything else
    gets a GGUFWeight parametrization. ``stored``: the Parameter to use as the stored tensor (to
    keep a tie), else a new one on meta. Returns (the stored tensor's name in the model, it)."""
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
    parametrize.register_parametrization(owner, attr, GGUFWeight(t, shape, dtype), unsafe=True)
    return f"{path + '.' if path else ''}parametrizations.{attr}.original", stored
