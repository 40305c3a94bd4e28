"""GGUF (llama.cpp) blocks to float32, on the device the blocks are on.

On the CPU with numba installed, each type is one fused kernel (cpu_kernels.py) writing into the
output tensor's memory; elsewhere (or without numba, or with VRAMANCER_GGUF_NUMBA=0) torch ops below.

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
# helpers over blocks: ``b`` is uint8 [n_blocks, block_bytes], ``o`` the float32 output [n_blocks,
# block_values]. The small integers are unpacked into a uint8 scratch with bit operations on int64
# words (8 bytes per operation: a shift then a mask per byte lane, no carry between lanes), converted
# into ``o`` in one pass, then scaled in place there: each float32 operation is numpy's, in its order.
def _rep(byte: int, lanes: int = 8) -> int:
    """``byte`` in every lane of a signed word of ``lanes`` bytes (int64 by default)."""
    return int.from_bytes(bytes([byte]) * lanes, "little", signed=True)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as float32 [n, 1] (read as one strided column of
    16-bit words where the layout allows: one long loop, not one 2-byte copy per block)."""
    import torch

    if at % 2 == 0 and b.stride(-1) == 1 and b.stride(0) % 2 == 0 and b.storage_offset() % 2 == 0:
        return b.view(torch.float16)[:, at // 2:at // 2 + 1].to(torch.float32)
    return b[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _per_group(d: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """``d`` [n, 1] times each of its block's small integers ``small`` (given as [g, n]: one row per
    group, any strides), as float32 (numpy's one multiply), shaped [n, g, 1] to scale groups of
    values. Computed as [g, n] rows so that each operation is one long loop."""
    import torch

    g, n = small.shape
    rows = torch.empty((g, n), dtype=torch.float32, device=small.device).copy_(small)
    return rows.mul_(d.view(1, n)).t().unsqueeze(-1)


def _words(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 [n, k] as words of ``dtype`` (int64 by default; k a multiple of their size) [n, k // size]:
    a view where the layout allows, else a view of an aligned copy."""
    import torch

    dtype = dtype or torch.int64
    size = torch.empty((), dtype=dtype).element_size()
    if not (x.stride(-1) == 1 and x.storage_offset() % size == 0 and all(st % size == 0 for st in x.stride()[:-1])):
        x = x.clone(memory_format=torch.contiguous_format)        # a fresh, aligned copy
    return x.view(dtype)


def _unpack(x: torch.Tensor, group: int, shifts: tuple[int, ...], mask: int, out: torch.Tensor) -> torch.Tensor:
    """Each run of ``group`` bytes of ``x`` [n, k] as len(shifts) runs of ``group`` values, written
    to ``out`` (uint8, [n, k // group * len(shifts) * group]): run i is (byte >> shifts[i]) & mask,
    a negative shift meaning a left shift. Returns ``out``."""
    import torch

    n = x.shape[0]
    words = group // 8
    x64 = _words(x).view(n, -1, 1, words)
    o64 = out.view(torch.int64).view(n, -1, len(shifts), words)
    for i, sh in enumerate(shifts):
        dst = o64[:, :, i:i + 1]
        if sh > 0:
            torch.bitwise_right_shift(x64, sh, out=dst)
        elif sh < 0:
            torch.bitwise_left_shift(x64, -sh, out=dst)
        else:
            dst.copy_(x64)
    o64.bitwise_and_(_rep(mask))
    return out


_HUGE_BYTES = 4 << 20
_PAGE = 4096


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new tensor. A large one in host memory is allocated by numpy, which asks Linux for huge
    pages (madvise) where torch's allocator does not: a fresh 16 MiB output then costs 8 page faults,
    not 4096, which on the CPU took longer than the dequantization itself. It starts on a page."""
    import torch

    if device.type == "cpu" and dtype in (torch.float32, torch.uint8):
        n = 1
        for s in shape:
            n *= s
        size = 4 if dtype == torch.float32 else 1
        if n * size >= _HUGE_BYTES:
            import numpy as np

            # starting on a page: a large block from glibc starts 16 bytes past one, and unaligned
            # weights slowed the matrix products that read them (and the kernels' 64-byte stores)
            raw = np.empty(n * size + _PAGE, dtype=np.uint8)
            skip = -raw.ctypes.data % _PAGE
            held = raw[skip:skip + n * size].view(np.float32 if size == 4 else np.uint8)
            return torch.from_numpy(held.reshape(shape))
    return torch.empty(shape, dtype=dtype, device=device)


def _scratch(b: torch.Tensor, values: int) -> torch.Tensor:
    import torch

    return _empty((b.shape[0], values), torch.uint8, b.device)


_BIT_LUT: dict[str, torch.Tensor] = {}


def _bits_of_bytes(qh: torch.Tensor) -> torch.Tensor:
    """Bit j of byte i of ``qh`` [n, k] at value 8 i + j, shifted to bit 4: uint8 [n, 8 k]
    (Q5_0 / Q5_1's 32 high bits, a little-endian uint32), by a 256-entry table."""
    import torch

    key = str(qh.device)
    lut = _BIT_LUT.get(key)
    if lut is None:
        bits = (torch.arange(256, dtype=torch.int32).view(256, 1) >> torch.arange(8, dtype=torch.int32)) & 1
        lut = _BIT_LUT[key] = (bits << 4).to(torch.uint8).to(qh.device)
    return lut.index_select(0, qh.reshape(-1).to(torch.int64)).view(qh.shape[0], -1)


def _or(s: torch.Tensor, t: torch.Tensor) -> None:
    """s |= t, 8 bytes at a time."""
    import torch

    s.view(torch.int64).bitwise_or_(t.view(torch.int64))


def _q8_0(b: torch.Tensor, o: torch.Tensor) -> None:
    import torch

    o.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor, o: torch.Tensor) -> None:
    import torch

    s = _unpack(b[:, 2:], 16, (0, 4), 0x0F, _scratch(b, 32)).sub_(8)
    o.copy_(s.view(torch.int8)).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor, o: torch.Tensor) -> None:
    s = _unpack(b[:, 4:], 16, (0, 4), 0x0F, _scratch(b, 32))
    o.copy_(s).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5(b: torch.Tensor, at: int) -> torch.Tensor:
    """The 5-bit values of a Q5_0 / Q5_1 block whose qh starts at byte ``at``: uint8 [n, 32]."""
    s = _unpack(b[:, at + 4:], 16, (0, 4), 0x0F, _scratch(b, 32))
    _or(s, _bits_of_bytes(b[:, at:at + 4]))
    return s


def _q5_0(b: torch.Tensor, o: torch.Tensor) -> None:
    import torch

    o.copy_(_q5(b, 2).sub_(16).view(torch.int8)).mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor, o: torch.Tensor) -> None:
    o.copy_(_q5(b, 4)).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q2_k(b: torch.Tensor, o: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, :16].contiguous()
    dl = _per_group(_f16(b, 80), (scales & 0x0F).t())
    ml = _per_group(_f16(b, 82), (scales >> 4).t())
    s = _unpack(b[:, 16:80], 32, (0, 2, 4, 6), 0x03, _scratch(b, QK_K))
    o.copy_(s).view(n, 16, 16).mul_(dl).sub_(ml)


def _split_bits(x: torch.Tensor, group: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Each run of ``group`` bytes of the small ``x`` [n, k] unpacked to len(shifts) runs of
    ``group`` values ((byte >> shift) & mask): [n, k // group, len(shifts), group] (scales)."""
    import torch

    n = x.shape[0]
    runs = x.reshape(n, -1, group)
    return torch.stack([(runs >> sh) & mask for sh in shifts], dim=2)


def _q3_k(b: torch.Tensor, o: torch.Tensor) -> None:
    import torch

    n = b.shape[0]
    sc = b[:, 96:108].contiguous()
    lo = _split_bits(sc[:, :8], 8, (0, 4), 0x0F).reshape(n, 16)
    hi = _split_bits(sc[:, 8:12], 4, (0, 2, 4, 6), 0x03).reshape(n, 16)
    dl = _per_group(_f16(b, 108), ((lo | (hi << 4)).to(torch.int8) - 32).t())
    s = _unpack(b[:, 32:96], 32, (0, 2, 4, 6), 0x03, _scratch(b, QK_K))
    # a clear hmask bit means an offset of -4: 4 * (1 - bit j) for value group j
    t = _unpack(_words(b[:, :32]).bitwise_not(), 32, (-2, -1, 0, 1, 2, 3, 4, 5), 0x04, _scratch(b, QK_K))
    s.sub_(t)
    o.copy_(s.view(torch.int8)).view(n, 16, 16).mul_(dl)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of a Q4_K / Q5_K block's 12 scale bytes, as uint8
    [8, n] each (one row per group), computed on its three little-endian int32 words (4 byte lanes)."""
    import torch

    w = _words(sc, torch.int32)
    n = w.shape[0]
    d, m, md = torch.empty((3, n), dtype=torch.int32, device=w.device).copy_(w.t())   # each contiguous
    scale = torch.stack([d & _rep(0x3F, 4), (md & _rep(0x0F, 4)) | ((d >> 2) & _rep(0x30, 4))])
    mn = torch.stack([m & _rep(0x3F, 4), ((md >> 4) & _rep(0x0F, 4)) | ((m >> 2) & _rep(0x30, 4))])

    def rows(x: torch.Tensor) -> torch.Tensor:     # [2, n] words -> [8, n] lanes (lane k of word j: row 4 j + k)
        return x.view(torch.uint8).view(2, n, 4).permute(0, 2, 1).reshape(8, n)

    return rows(scale), rows(mn)


def _k_dm(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d * scale, dmin * min) of a Q4_K / Q5_K block, [n, 8, 1] each."""
    scale, mn = _k_scale_min(b[:, 4:16])
    return _per_group(_f16(b, 0), scale), _per_group(_f16(b, 2), mn)


def _q4_k(b: torch.Tensor, o: torch.Tensor) -> None:
    n = b.shape[0]
    d, dm = _k_dm(b)
    s = _unpack(b[:, 16:], 32, (0, 4), 0x0F, _scratch(b, QK_K))
    o.copy_(s).view(n, 8, 32).mul_(d).sub_(dm)


def _q5_k(b: torch.Tensor, o: torch.Tensor) -> None:
    n = b.shape[0]
    d, dm = _k_dm(b)
    s = _unpack(b[:, 48:], 32, (0, 4), 0x0F, _scratch(b, QK_K))
    _or(s, _unpack(b[:, 16:48], 32, (-4, -3, -2, -1, 0, 1, 2, 3), 0x10, _scratch(b, QK_K)))
    o.copy_(s).view(n, 8, 32).mul_(d).sub_(dm)


def _q6_k(b: torch.Tensor, o: torch.Tensor) -> None:
    import torch

    n = b.shape[0]
    s = _unpack(b[:, :128], 64, (0, 4), 0x0F, _scratch(b, QK_K))
    _or(s, _unpack(b[:, 128:192], 32, (-4, -2, 0, 2), 0x30, _scratch(b, QK_K)))
    s.sub_(32)
    d = _per_group(_f16(b, 208), b[:, 192:208].view(torch.int8).t())
    o.copy_(s.view(torch.int8)).view(n, 16, 16).mul_(d)


_BLOCK_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


_NO_KERNELS = object()
_KERNELS: object = None


def _cpu_kernels():  # -> the cpu_kernels module, or None without numba
    """The fused one-pass CPU kernels (cpu_kernels.py, numba), imported on first use; None where
    numba is not installed (or VRAMANCER_GGUF_NUMBA=0): the torch path then runs on the CPU too."""
    global _KERNELS
    if _KERNELS is None:
        from ... import envs

        _KERNELS = _NO_KERNELS
        if envs.get("VRAMANCER_GGUF_NUMBA"):
            try:
                from . import cpu_kernels
            except ImportError:
                pass
            else:
                _KERNELS = cpu_kernels
    return None if _KERNELS is _NO_KERNELS else _KERNELS


def dequantize(raw: torch.Tensor, qtype: str | int | GGUFType, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[..., values_per_row]`` from the GGUF bytes ``raw`` (uint8 ``[..., bytes_per_row]``,
    rows of whole blocks), on ``raw``'s device; bit for bit gguf-py's numpy dequantization.
    ``out``: a contiguous float32 tensor of that shape to write into (and return) instead of a new one."""
    import torch

    t = gguf_type(qtype)
    if raw.dtype != torch.uint8:
        raise BadInputError(f"GGUF blocks must be uint8 bytes, not {raw.dtype}")
    if raw.dim() == 0 or raw.shape[-1] % t.block_bytes:
        raise BadInputError(f"rows of {raw.shape[-1] if raw.dim() else 0} bytes are not whole "
                            f"{t.name} blocks of {t.block_bytes} bytes")
    lead = tuple(raw.shape[:-1])
    values = raw.shape[-1] // t.block_bytes * t.block_values
    fresh = out is None
    if fresh:
        out = _empty((*lead, values), torch.float32, raw.device)
    elif (tuple(out.shape) != (*lead, values) or out.dtype != torch.float32 or not out.is_contiguous()
          or out.device != raw.device):
        raise ValueError(f"out must be a contiguous float32 {[*lead, values]} on {raw.device}, "
                         f"not {out.dtype} {list(out.shape)} on {out.device}")
    if out.numel() and raw.device.type == "cpu" and t.name != "F32" and _cpu_kernels() is not None:
        blocks = raw.contiguous().numpy()
        if t.quantized:
            _cpu_kernels().dequantize_into(t.name, blocks.reshape(-1, t.block_bytes),
                                           out.numpy().reshape(-1, t.block_values), reused=not fresh)
        else:
            _cpu_kernels().dequantize_into(t.name, blocks.reshape(-1), out.numpy().reshape(-1), reused=not fresh)
        return out
    if not t.quantized:
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.name]
        return out.copy_(raw.contiguous().view(dt).reshape(out.shape))
    if out.numel():
        _BLOCK_FNS[t.name](raw.contiguous().reshape(-1, t.block_bytes), out.view(-1, t.block_values))
    return out
