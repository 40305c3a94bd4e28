"""GGUF (llama.cpp) blocks to float32 in torch, on the device the blocks are on.

``dequantize(raw, "Q4_K")`` takes the raw bytes of a tensor as GGUF stores it, a uint8 tensor
``[..., bytes_per_row]`` (each row is whole blocks), and returns float32 ``[..., values_per_row]``.
Every type gives the same bits as ``gguf.quants.dequantize`` (the numpy reference of gguf-py): the
same float32 operations in the same order (a scale times a small integer, then minus a scaled
minimum), each as its own elementwise op, so no fused multiply-add changes a rounding.

Layouts (bytes of one block, little-endian; QK_K = 256 values per K-quant super-block):
  Q8_0  d:f16 | 32 x int8                              v = d*q
  Q4_0  d:f16 | 16 bytes of nibbles                    v = d*(q-8)
  Q4_1  d:f16 m:f16 | 16 bytes of nibbles              v = d*q + m
  Q5_0  d:f16 | qh:4 bytes (bit 4 of each value) | qs  v = d*(q-16)
  Q5_1  d:f16 m:f16 | qh | qs                          v = d*q + m
  Q2_K  scales:16 (lo 4 bits scale, hi 4 bits min) | qs:64 (2-bit) | d:f16 dmin:f16
  Q3_K  hmask:32 | qs:64 (2-bit) | scales:12 (16 x 6-bit, biased by 32) | d:f16
  Q4_K  d:f16 dmin:f16 | scales:12 (8 x 6-bit scale, 8 x 6-bit min) | qs:128 (nibbles)
  Q5_K  d:f16 dmin:f16 | scales:12 | qh:32 | qs:128
  Q6_K  ql:128 | qh:64 | scales:16 x int8 | d:f16      v = d*scale*(q-32)
Nibbles: within each group of bytes, the values are all low nibbles first, then all high nibbles.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["GGUFType", "GGUF_TYPES", "gguf_type", "dequantize", "row_bytes"]

QK_K = 256


@dataclass(frozen=True)
class GGUFType:
    """``block_values`` values are stored in ``block_bytes`` bytes; ``ggml_id`` is the type number
    in a GGUF header (gguf.GGMLQuantizationType)."""

    name: str
    ggml_id: int
    block_values: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.name not in ("F32", "F16", "BF16")

    def row_bytes(self, values: int) -> int:
        if values % self.block_values:
            raise BadInputError(f"a row of {values} values is not whole {self.name} blocks of {self.block_values}")
        return values // self.block_values * self.block_bytes


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("F32", 0, 1, 4), GGUFType("F16", 1, 1, 2), GGUFType("BF16", 30, 1, 2),
    GGUFType("Q8_0", 8, 32, 34), GGUFType("Q4_0", 2, 32, 18), GGUFType("Q4_1", 3, 32, 20),
    GGUFType("Q5_0", 6, 32, 22), GGUFType("Q5_1", 7, 32, 24),
    GGUFType("Q2_K", 10, QK_K, 84), GGUFType("Q3_K", 11, QK_K, 110), GGUFType("Q4_K", 12, QK_K, 144),
    GGUFType("Q5_K", 13, QK_K, 176), GGUFType("Q6_K", 14, QK_K, 210),
)}
_BY_ID = {t.ggml_id: t for t in GGUF_TYPES.values()}


def gguf_type(qtype: str | int | GGUFType | object) -> GGUFType:
    """The type named by ``qtype`` ("Q4_K", a GGMLQuantizationType, or its number); BadInputError
    naming it when it is not one we dequantize."""
    if isinstance(qtype, GGUFType):
        return qtype
    name = getattr(qtype, "name", None)
    if isinstance(qtype, int) and not isinstance(qtype, bool):
        t = _BY_ID.get(int(qtype))
        if t is not None:
            return t
    elif isinstance(name, str) or isinstance(qtype, str):
        t = GGUF_TYPES.get(str(name if name is not None else qtype).upper())
        if t is not None:
            return t
    raise BadInputError(f"GGUF tensor type {name or qtype} is not supported "
                        f"(supported: {', '.join(GGUF_TYPES)})")


def row_bytes(qtype: str | int | GGUFType, values: int) -> int:
    """Bytes of one row of ``values`` values stored as ``qtype``."""
    return gguf_type(qtype).row_bytes(values)


# ------------------------------------------------------------------------------------------------
# helpers over blocks: ``b`` is uint8 [n_blocks, block_bytes]
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as float32 [n, 1]."""
    import torch

    return b[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``values`` (0, step, 2 step, ...) as a uint8 tensor made on ``like``'s device (an arange: no
    host-to-device copy, so no stream synchronisation on a GPU)."""
    import torch

    step = values[1] - values[0] if len(values) > 1 else 1
    out = torch.arange(values[0], values[0] + step * len(values), step, dtype=torch.uint8, device=like.device)
    return out


def _split_bits(x: torch.Tensor, group: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Each run of ``group`` bytes of ``x`` [n, k] unpacked to len(shifts) runs of ``group`` values
    ((byte >> shift) & mask, one run per shift in order): [n, k // group, len(shifts), group]."""
    n = x.shape[0]
    s = _shifts(shifts, x).view(1, 1, len(shifts), 1)
    return (x.reshape(n, -1, 1, group) >> s).bitwise_and_(mask)


def _bits(x: torch.Tensor, group: int) -> torch.Tensor:
    """Bit i of each byte of each run of ``group`` bytes: [n, k // group, 8, group] of 0/1."""
    return _split_bits(x, group, tuple(range(8)), 1)


def _float(q: torch.Tensor) -> torch.Tensor:
    """The one float32 tensor a block function allocates; the scaling is then done in place on it
    (each multiply and subtract its own rounding, as numpy does)."""
    import torch

    return q.to(torch.float32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    import torch

    return _float(b[:, 2:].view(torch.int8)).mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    import torch

    n = b.shape[0]
    q = _split_bits(b[:, 2:], 16, (0, 4), 0x0F).reshape(n, 32).to(torch.int8).sub_(8)
    return _float(q).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    q = _float(_split_bits(b[:, 4:], 16, (0, 4), 0x0F).reshape(n, 32))
    return q.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5(b: torch.Tensor, at: int) -> torch.Tensor:
    """The 5-bit values of a Q5_0 / Q5_1 block whose qh starts at byte ``at``: uint8 [n, 32]."""
    n = b.shape[0]
    hi = _bits(b[:, at:at + 4], 1).reshape(n, 32)        # bit j of byte i (a little-endian u32) -> value 8i+j
    lo = _split_bits(b[:, at + 4:], 16, (0, 4), 0x0F).reshape(n, 32)
    return lo.bitwise_or_(hi.bitwise_left_shift_(4))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    import torch

    q = _q5(b, 2).to(torch.int8).sub_(16)
    return _float(q).mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _float(_q5(b, 4)).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * _float(scales & 0x0F)).reshape(n, 16, 1)
    ml = (dmin * _float(scales >> 4)).reshape(n, 16, 1)
    q = _float(_split_bits(b[:, 16:80], 32, (0, 2, 4, 6), 0x03).reshape(n, 16, 16))
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    import torch

    n = b.shape[0]
    sc = b[:, 96:108]
    lo = _split_bits(sc[:, :8], 8, (0, 4), 0x0F).reshape(n, 16)
    hi = _split_bits(sc[:, 8:12], 4, (0, 2, 4, 6), 0x03).reshape(n, 16)
    scales = _float((lo | (hi << 4)).to(torch.int8) - 32)
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = _split_bits(b[:, 32:96], 32, (0, 2, 4, 6), 0x03).reshape(n, 16, 16).to(torch.int8)
    qh = _bits(b[:, :32], 32).reshape(n, 16, 16).bitwise_xor_(1)    # a set bit means no offset
    q = _float(ql.sub_(qh.bitwise_left_shift_(2).view(torch.int8)))
    return q.mul_(dl).reshape(n, QK_K)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of a Q4_K / Q5_K block's 12 scale bytes."""
    import torch

    n = sc.shape[0]
    s = sc.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, mn


def _k_dm(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d * scale, dmin * min) of a Q4_K / Q5_K block, [n, 8, 1] each."""
    n = b.shape[0]
    scale, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * _float(scale)).reshape(n, 8, 1)
    dm = (_f16(b, 2) * _float(mn)).reshape(n, 8, 1)
    return d, dm


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_dm(b)
    q = _float(_split_bits(b[:, 16:], 32, (0, 4), 0x0F).reshape(n, 8, 32))
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_dm(b)
    ql = _split_bits(b[:, 48:], 32, (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 32).reshape(n, 8, 32)
    q = _float(ql.bitwise_or_(qh.bitwise_left_shift_(4)))
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    import torch

    n = b.shape[0]
    ql = _split_bits(b[:, :128], 64, (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _split_bits(b[:, 128:192], 32, (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
    q = _float(ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32).reshape(n, 16, 16))
    scales = _float(b[:, 192:208].view(torch.int8))
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    return q.mul_(d).reshape(n, QK_K)


_BLOCK_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(raw: torch.Tensor, qtype: str | int | GGUFType) -> torch.Tensor:
    """float32 ``[..., values_per_row]`` from the GGUF bytes ``raw`` (uint8 ``[..., bytes_per_row]``,
    rows of whole blocks), on ``raw``'s device; bit for bit gguf-py's numpy dequantization."""
    import torch

    t = gguf_type(qtype)
    if raw.dtype != torch.uint8:
        raise BadInputError(f"GGUF blocks must be uint8 bytes, not {raw.dtype}")
    if raw.dim() == 0 or raw.shape[-1] % t.block_bytes:
        raise BadInputError(f"rows of {raw.shape[-1] if raw.dim() else 0} bytes are not whole "
                            f"{t.name} blocks of {t.block_bytes} bytes")
    lead = tuple(raw.shape[:-1])
    values = raw.shape[-1] // t.block_bytes * t.block_values
    if t.name in ("F32", "F16", "BF16"):
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.name]
        out = raw.contiguous().view(dt)
        return out.to(torch.float32) if dt != torch.float32 else out.clone()
    blocks = raw.contiguous().reshape(-1, t.block_bytes)
    out = _BLOCK_FNS[t.name](blocks)
    return out.reshape(*lead, values)
