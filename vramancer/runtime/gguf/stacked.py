"""MoE gate and up experts of different GGUF types, kept as their blocks in one stored tensor.

transformers fuses each MoE layer's gate and up experts into one parameter, ``experts.gate_up_proj``
``[experts, 2 x rows, cols]`` (each expert's gate rows, then its up rows), which llama.cpp stores as
two tensors, ``blk.N.ffn_gate_exps`` and ``blk.N.ffn_up_exps`` ``[experts, rows, cols]``. When both
have the same type their rows stack as they are (``SameTypeGateUp``). llama.cpp's mixes (Q4_K_M, Q3_K_M, ...)
give tensors of one layer different types, and rows of different types have different byte widths,
so here the stored tensor is uint8 ``[experts, rows, gate_row_bytes + up_row_bytes]``: row ``r`` of
expert ``e`` holds gate row ``r``'s bytes, then up row ``r``'s. Its bytes are exactly the file's two
tensors' (what the plan counts); ``GGUFGateUp``, a parametrization like modules.GGUFWeight, reads it
back as the float ``gate_up_proj``: both halves dequantized, gate rows then up rows per expert; and
``expert(stored, e)`` dequantizes one expert's (runtime/experts.py's host path, top-k experts only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .dequant import GGUFType, dequantize, gguf_type

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .load import GGUFTensor


__all__ = ["GGUFGateUp", "GateUpExperts", "SameTypeGateUp", "MixedGateUp", "keep_gate_up"]


def _half(stored: torch.Tensor, qtype: GGUFType, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(stored.contiguous(), qtype).reshape(*stored.shape[:-1], cols).to(dtype)


class GGUFGateUp(nn.Module):
    """Parametrization: uint8 ``[experts, rows, gate_bytes + up_bytes]`` -> float
    ``[experts, 2 x rows, cols]`` in ``dtype`` (module docstring)."""

    def __init__(self, gate: str | GGUFType, up: str | GGUFType, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.gate, self.up = gguf_type(gate), gguf_type(up)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.cols = self.shape[-1]
        self.gate_bytes = self.gate.row_bytes(self.cols)

    def _rows(self, stored: torch.Tensor) -> torch.Tensor:
        g = _half(stored[..., :self.gate_bytes], self.gate, self.cols, self.dtype)
        u = _half(stored[..., self.gate_bytes:], self.up, self.cols, self.dtype)
        return torch.cat([g, u], dim=-2)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return self._rows(stored).reshape(self.shape)

    def expert(self, stored: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s float ``[2 x rows, cols]``, only its rows dequantized."""
        return self._rows(stored[e])

    def extra_repr(self) -> str:
        return f"gate {self.gate.name}, up {self.up.name}, shape={list(self.shape)}, dtype={self.dtype}"


@dataclass(frozen=True)
class GateUpExperts:
    """transformers' ``experts.gate_up_proj`` [experts, 2 * rows, cols] made of llama.cpp's
    ffn_gate_exps and ffn_up_exps [experts, rows, cols]; its bytes are the two tensors'. How the stored
    tensor lays them out is the subclass's ``read``: ``SameTypeGateUp`` (one type), ``MixedGateUp``."""

    name: str
    shape: tuple[int, ...]
    gate: GGUFTensor
    up: GGUFTensor

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes


@dataclass(frozen=True)
class SameTypeGateUp(GateUpExperts):
    """Gate and up of one type: each expert's gate rows then its up rows (rows are whole blocks, so the
    stored bytes stack the same way)."""

    @property
    def qtype(self) -> GGUFType:
        return self.gate.qtype

    def read(self, rows: np.ndarray | None = None) -> torch.Tensor:
        return torch.cat([self.gate.read(), self.up.read()], dim=1)


@dataclass(frozen=True)
class MixedGateUp(GateUpExperts):
    """The stacked ``gate_up_proj`` [experts, 2 x rows, cols] of llama.cpp's gate and up experts of
    different types: ``read()`` gives the stored uint8 tensor of the module docstring."""

    def read(self, rows: np.ndarray | None = None) -> torch.Tensor:
        def raw(t: GGUFTensor) -> torch.Tensor:
            out = t.read()
            return out if out.dtype == torch.uint8 else out.contiguous().view(torch.uint8)

        return torch.cat([raw(self.gate), raw(self.up)], dim=-1)


def keep_gate_up(model: nn.Module, name: str, t: MixedGateUp, dtype: torch.dtype,
                 stored: nn.Parameter | None = None) -> tuple[str, nn.Parameter]:
    """Make parameter ``name`` of ``model`` (on meta) the stored uint8 tensor of ``t`` read back by a
    GGUFGateUp parametrization as ``dtype``. Returns (the stored tensor's state name, it)."""
    from torch.nn.utils import parametrize

    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    e, rows, cols = t.gate.shape
    width = gguf_type(t.gate.qtype).row_bytes(cols) + gguf_type(t.up.qtype).row_bytes(cols)
    if stored is None:
        stored = nn.Parameter(torch.empty((e, rows, width), dtype=torch.uint8, device="meta"), requires_grad=False)
    setattr(owner, attr, stored)
    parametrize.register_parametrization(owner, attr, GGUFGateUp(t.gate.qtype, t.up.qtype, tuple(t.shape), dtype),
                                         unsafe=True)
    return f"{path + '.' if path else ''}parametrizations.{attr}.original", stored
