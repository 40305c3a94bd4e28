"""VRAMancer Link framing: a fixed binary header, one descriptor per tensor, then the raw buffers.

Byte layout (little endian; docs/link-protocol.md documents it byte by byte):

    header (36 bytes)   magic b"VRML" | version u8 | type u8 | flags u16 | stream id u32 | sequence u64
                        | tensor count u16 | reserved u16 (0) | descriptor bytes u32 | payload bytes u64
    descriptor (12 + 8*ndim bytes, one per tensor)
                        dtype code u8 | ndim u8 | reserved u16 (0) | byte length u64 | shape: ndim x u64
    payload             each tensor's bytes, in descriptor order, C-contiguous, no padding

Everything about a frame is checked by :class:`FrameReader` from the header and descriptors alone,
before a byte of payload is allocated: magic, version, known type, no unknown flag, known dtype, ndim
and tensor count limits, byte length == numel * itemsize (an empty tensor's nonzero dimensions multiplied
as if full also within the frame limit), the sum equal to the header's payload bytes,
the whole frame under ``Limits.max_frame_bytes``, and the sequence number strictly above the last one
seen on that stream (a replayed or reordered frame is refused). A refusal is a :class:`FrameError`.
"""
from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from .errors import FrameError

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER",
    "HEADER_BYTES",
    "DESC_FIXED",
    "DESC_FIXED_BYTES",
    "FrameType",
    "DType",
    "DTYPES",
    "DTYPE_BY_NAME",
    "TensorDesc",
    "FrameHeader",
    "Limits",
    "FrameWriter",
    "FrameReader",
    "BufferFactory",
    "numpy_buffers",
    "torch_buffers",
    "as_payload",
    "dest_view",
    "torch_array",
    "torch_code",
]

MAGIC = b"VRML"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQHHIQ")
HEADER_BYTES = HEADER.size  # 36
_unpack_header = HEADER.unpack_from
DESC_FIXED = struct.Struct("<BBHQ")
DESC_FIXED_BYTES = DESC_FIXED.size  # 12


class FrameType(IntEnum):
    TENSORS = 1   # count >= 0 tensors follow
    CLOSE = 2     # the sender is done; no tensors
    REKEY = 3     # TLS: the sender reconnects with a fresh handshake after this frame; no tensors


@dataclass(frozen=True)
class DType:
    code: int
    name: str          # the torch / numpy name ("float32")
    itemsize: int
    numpy: str | None  # numpy dtype string, None when numpy has no such type (bfloat16)


DTYPES: dict[int, DType] = {d.code: d for d in (
    DType(1, "bool", 1, "bool"),
    DType(2, "uint8", 1, "uint8"),
    DType(3, "int8", 1, "int8"),
    DType(4, "int16", 2, "int16"),
    DType(5, "int32", 4, "int32"),
    DType(6, "int64", 8, "int64"),
    DType(7, "float16", 2, "float16"),
    DType(8, "float32", 4, "float32"),
    DType(9, "float64", 8, "float64"),
    DType(10, "complex64", 8, "complex64"),
    DType(11, "complex128", 16, "complex128"),
    DType(12, "bfloat16", 2, None),
    DType(13, "uint16", 2, "uint16"),
    DType(14, "uint32", 4, "uint32"),
    DType(15, "uint64", 8, "uint64"),
)}
DTYPE_BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES.values()}


@dataclass(frozen=True)
class TensorDesc:
    dtype_code: int
    shape: tuple[int, ...]
    byte_length: int

    @property
    def dtype(self) -> DType:
        return DTYPES[self.dtype_code]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def encode(self) -> bytes:
        n = len(self.shape)
        return struct.pack(f"<BBHQ{n}Q", self.dtype_code, n, 0, self.byte_length, *self.shape)


@dataclass(frozen=True)
class FrameHeader:
    frame_type: FrameType
    flags: int
    stream_id: int
    seq: int
    count: int
    desc_bytes: int
    payload_bytes: int

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, int(self.frame_type), self.flags, self.stream_id, self.seq,
                           self.count, 0, self.desc_bytes, self.payload_bytes)


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. ``max_frame_bytes`` bounds header + descriptors + payload."""

    max_frame_bytes: int = 1 << 30
    max_tensors: int = 1024
    max_ndim: int = 8
    max_streams: int = 4096

    def max_desc_bytes(self, count: int) -> int:
        return count * (DESC_FIXED_BYTES + 8 * self.max_ndim)


class FrameWriter:
    """Numbers frames: per stream, sequence numbers 1, 2, 3, ..."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}

    def next_seq(self, stream_id: int) -> int:
        """The sequence number of the next frame on ``stream_id`` (taken: the following call gets +1)."""
        seq = self._next.get(stream_id)
        if seq is None:
            if not 0 <= stream_id < 1 << 32:
                raise FrameError(f"stream id {stream_id} is not a u32")
            seq = 1
        self._next[stream_id] = seq + 1
        return seq

    def header(self, frame_type: FrameType, descs: Sequence[TensorDesc], stream_id: int = 0) -> bytes:
        seq = self.next_seq(stream_id)
        desc_blob = b"".join([d.encode() for d in descs])
        payload = 0
        for d in descs:
            payload += d.byte_length
        return HEADER.pack(MAGIC, VERSION, frame_type, 0, stream_id, seq, len(descs), 0, len(desc_blob),
                           payload) + desc_blob


_CACHED_BLOCKS = 64
_CACHED_BLOCK_BYTES = 1024


class FrameReader:
    """Validates headers and descriptors against ``limits`` and the per-stream sequence.
    ``last_seq``: stream id -> the last sequence number accepted. Descriptor blocks (up to 1 KiB)
    that passed validation are kept (64 at most): the same block is not parsed again."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.last_seq: dict[int, int] = {}
        self._blocks: dict[bytes, tuple[tuple[TensorDesc, ...], int]] = {}

    def known_frame(self, buf: memoryview, lo: int, hi: int) -> tuple[list[TensorDesc], int, int, int] | None:
        """The common case, checked where it lies: ``buf[lo:hi]`` starts with a whole TENSORS header
        and descriptor block, on a stream seen before, with the next sequence number, within the
        limits, and a descriptor block this reader validated before (same bytes, same tensor count
        and payload bytes). Returns (descriptors, stream id, sequence, offset of the payload), or None:
        then ``parse_header`` / ``parse_descriptors`` decide (and name the reason of a refusal)."""
        magic, version, ftype, flags, stream_id, seq, count, reserved, desc_bytes, payload_bytes = \
            _unpack_header(buf, lo)
        last = self.last_seq.get(stream_id)
        end = lo + HEADER_BYTES + desc_bytes
        if ftype != 1 or magic != MAGIC or version != VERSION or flags or reserved or last is None \
                or seq <= last or end > hi or desc_bytes > _CACHED_BLOCK_BYTES \
                or HEADER_BYTES + desc_bytes + payload_bytes > self.limits.max_frame_bytes:
            return None
        hit = self._blocks.get(bytes(buf[lo + HEADER_BYTES:end]))
        if hit is None or len(hit[0]) != count or hit[1] != payload_bytes:
            return None
        return list(hit[0]), stream_id, seq, end

    def parse_header(self, buf: bytes | bytearray | memoryview) -> FrameHeader:
        if len(buf) != HEADER_BYTES:
            raise FrameError(f"header is {len(buf)} bytes, expected {HEADER_BYTES}")
        magic, version, ftype, flags, stream_id, seq, count, reserved, desc_bytes, payload_bytes = HEADER.unpack(buf)
        lim = self.limits
        if magic != MAGIC:
            raise FrameError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
        if version != VERSION:
            raise FrameError(f"unsupported version {version} (this side speaks {VERSION})")
        try:
            frame_type = FrameType(ftype)
        except ValueError:
            raise FrameError(f"unknown frame type {ftype}") from None
        if flags != 0:
            raise FrameError(f"unknown flags 0x{flags:04x}")
        if reserved != 0:
            raise FrameError(f"reserved header field is {reserved}, must be 0")
        if frame_type != FrameType.TENSORS and (count or desc_bytes or payload_bytes):
            raise FrameError(f"{frame_type.name} frame carries tensors")
        if count > lim.max_tensors:
            raise FrameError(f"{count} tensors, limit {lim.max_tensors}")
        if not count * DESC_FIXED_BYTES <= desc_bytes <= lim.max_desc_bytes(count):
            raise FrameError(f"descriptor bytes {desc_bytes} impossible for {count} tensors")
        total = HEADER_BYTES + desc_bytes + payload_bytes
        if total > lim.max_frame_bytes:
            raise FrameError(f"frame of {total} bytes over the limit of {lim.max_frame_bytes}")
        last = self.last_seq.get(stream_id)
        if last is None and len(self.last_seq) >= lim.max_streams:
            raise FrameError(f"more than {lim.max_streams} streams")
        if seq <= (last or 0):
            raise FrameError(f"stream {stream_id}: sequence {seq} not after {last or 0} (replayed or reordered)")
        return FrameHeader(frame_type, flags, stream_id, seq, count, desc_bytes, payload_bytes)

    def parse_descriptors(self, head: FrameHeader, buf: bytes | bytearray | memoryview) -> list[TensorDesc]:
        if len(buf) != head.desc_bytes:
            raise FrameError(f"descriptor block is {len(buf)} bytes, header says {head.desc_bytes}")
        lim = self.limits
        out: list[TensorDesc] = []
        pos = 0
        payload = 0
        mv = memoryview(buf)
        for i in range(head.count):
            if pos + DESC_FIXED_BYTES > len(mv):
                raise FrameError(f"descriptor {i} runs past the descriptor block")
            code, ndim, reserved, byte_length = DESC_FIXED.unpack_from(mv, pos)
            pos += DESC_FIXED_BYTES
            dtype = DTYPES.get(code)
            if dtype is None:
                raise FrameError(f"tensor {i}: unknown dtype code {code}")
            if reserved != 0:
                raise FrameError(f"tensor {i}: reserved descriptor field is {reserved}, must be 0")
            if ndim > lim.max_ndim:
                raise FrameError(f"tensor {i}: {ndim} dimensions, limit {lim.max_ndim}")
            if pos + 8 * ndim > len(mv):
                raise FrameError(f"tensor {i}: shape runs past the descriptor block")
            shape = struct.unpack_from(f"<{ndim}Q", mv, pos)
            pos += 8 * ndim
            numel = 1
            for d in shape:
                numel *= d
            if numel == 0:                 # an empty tensor's other dimensions: bounded as a full one's
                span = 1
                for d in shape:
                    span *= d or 1
                if span * dtype.itemsize > lim.max_frame_bytes:
                    raise FrameError(f"tensor {i}: empty {dtype.name} {list(shape)} has dimensions over the "
                                     f"frame limit of {lim.max_frame_bytes} bytes")
            if byte_length != numel * dtype.itemsize:
                raise FrameError(f"tensor {i}: byte length {byte_length} != {numel} x {dtype.itemsize} "
                                 f"({dtype.name} {list(shape)})")
            payload += byte_length
            if payload > head.payload_bytes:
                raise FrameError(f"tensor {i}: payload past the header's {head.payload_bytes} bytes")
            out.append(TensorDesc(code, tuple(shape), byte_length))
        if pos != len(mv):
            raise FrameError(f"{len(mv) - pos} stray bytes after the descriptors")
        if payload != head.payload_bytes:
            raise FrameError(f"tensors hold {payload} bytes, header says {head.payload_bytes}")
        if len(mv) <= _CACHED_BLOCK_BYTES:
            if len(self._blocks) >= _CACHED_BLOCKS:
                self._blocks.clear()
            self._blocks[bytes(mv)] = (tuple(out), payload)
        return out

    def accept(self, head: FrameHeader) -> None:
        """Record ``head``'s sequence number: called once the whole frame has arrived intact."""
        self.last_seq[head.stream_id] = head.seq


# A buffer factory makes the destination of one tensor: (the object handed to the caller,
# a writable byte view of exactly desc.byte_length bytes into it). Called only after validation.
BufferFactory = Callable[[TensorDesc], "tuple[Any, memoryview]"]


def numpy_buffers(desc: TensorDesc) -> tuple[Any, memoryview]:
    import numpy as np

    if desc.dtype.numpy is None:
        raise FrameError(f"{desc.dtype.name} has no numpy type: receive it with torch_buffers")
    arr = np.empty(desc.shape, dtype=desc.dtype.numpy)
    return arr, memoryview(arr.reshape(-1).view(np.uint8))


def torch_buffers(desc: TensorDesc) -> tuple[Any, memoryview]:
    import torch

    t = torch.empty(desc.shape, dtype=getattr(torch, desc.dtype.name))
    return t, _torch_bytes(t)


def _torch_bytes(t: Any) -> memoryview:
    import torch

    flat = t.reshape(-1)
    # numpy has no bfloat16 and torch's unsigned 16-64 bit types convert poorly: view them as signed ints
    alias = {torch.bfloat16: torch.int16, torch.uint16: torch.int16, torch.uint32: torch.int32,
             torch.uint64: torch.int64}.get(flat.dtype)
    if alias is not None:
        flat = flat.view(alias)
    return memoryview(flat.numpy()).cast("B")


class _TorchInfo:
    """torch.Tensor, torch dtype -> Link dtype code, and the signed stand-ins numpy needs."""

    def __init__(self) -> None:
        import torch

        self.tensor = torch.Tensor
        self.codes = {getattr(torch, d.name): d.code for d in DTYPES.values()}
        self.alias = {torch.bfloat16: torch.int16, torch.uint16: torch.int16, torch.uint32: torch.int32,
                      torch.uint64: torch.int64}


_TORCH: list[_TorchInfo] = []


def torch_array(t: Any) -> np.ndarray | None:
    """A numpy array over the very bytes of ``t`` when it is a CPU, contiguous torch tensor of a
    Link dtype (bfloat16 and unsigned types seen as signed ints of their size), else None.
    Never imports torch: a process that has not imported it has no tensors."""
    if not _TORCH:
        if "torch" not in sys.modules:
            return None
        _TORCH.append(_TorchInfo())
    info = _TORCH[0]
    if type(t) is not info.tensor or not t.is_cpu or t.dtype not in info.codes or not t.is_contiguous():
        return None
    if t.requires_grad:
        t = t.detach()
    alias = info.alias.get(t.dtype)
    return (t.view(alias) if alias is not None else t).numpy()


def torch_code(t: Any) -> int | None:
    """The Link dtype code of torch tensor ``t`` (call after ``torch_array`` returned an array)."""
    return _TORCH[0].codes.get(t.dtype)


@functools.lru_cache(maxsize=64)
def _dtype_of(dtype: Any) -> DType | None:
    """The Link dtype of a numpy dtype or torch dtype (cached: numpy's dtype.name is slow)."""
    module = type(dtype).__module__
    if module.startswith("torch"):
        return DTYPE_BY_NAME.get(str(dtype).removeprefix("torch."))
    if dtype.byteorder == ">":
        return None
    return DTYPE_BY_NAME.get(dtype.name)


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch")


def as_payload(obj: Any) -> tuple[TensorDesc, memoryview, Any]:
    """(descriptor, byte view, the object kept alive) of a numpy array or CPU torch tensor.
    Non-contiguous input is made contiguous and GPU tensors are copied to the host (a copy each)."""
    if _is_torch(obj):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        dtype = _dtype_of(t.dtype)
        if dtype is None:
            raise FrameError(f"dtype {t.dtype} cannot travel over the Link")
        mv = _torch_bytes(t)
        return TensorDesc(dtype.code, tuple(t.shape), t.numel() * dtype.itemsize), mv, t
    import numpy as np

    if isinstance(obj, np.generic):          # a numpy scalar travels as a 0-d tensor
        obj = np.asarray(obj)
    if not isinstance(obj, np.ndarray):
        raise FrameError(f"cannot send a {type(obj).__name__}: numpy arrays and torch tensors only")
    arr = obj if obj.flags.c_contiguous else obj.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
    dtype = _dtype_of(arr.dtype)
    if dtype is None:
        raise FrameError(f"dtype {arr.dtype} cannot travel over the Link")
    return TensorDesc(dtype.code, tuple(arr.shape), arr.nbytes), memoryview(arr.reshape(-1).view(np.uint8)), arr


_NUMPY_CODES: dict[Any, int] = {np.dtype(d.numpy): d.code for d in DTYPES.values() if d.numpy is not None}


def dest_view(obj: Any, desc: TensorDesc) -> memoryview:
    """A writable byte view of a caller-given destination for ``desc``: a numpy array or torch tensor
    of the same dtype and shape, or any writable buffer of exactly ``desc.byte_length`` bytes."""
    if type(obj) is np.ndarray:
        flags = obj.flags
        if obj.shape == desc.shape and _NUMPY_CODES.get(obj.dtype) == desc.dtype_code and flags.c_contiguous \
                and flags.writeable:
            return memoryview(obj).cast("B") if obj.size else memoryview(obj.reshape(-1).view(np.uint8))
    else:
        arr = torch_array(obj)
        if arr is not None and obj.shape == desc.shape and torch_code(obj) == desc.dtype_code:
            return memoryview(arr).cast("B") if arr.size else memoryview(arr.reshape(-1).view(np.uint8))
    if _is_torch(obj):
        name = str(obj.dtype).removeprefix("torch.")
        if _dtype_of(obj.dtype) is not desc.dtype or tuple(obj.shape) != desc.shape or not obj.is_contiguous() \
                or obj.device.type != "cpu":
            raise FrameError(f"destination is {name} {list(obj.shape)}, frame has {desc.dtype.name} {list(desc.shape)}")
        return _torch_bytes(obj)
    if isinstance(obj, np.ndarray):
        if _dtype_of(obj.dtype) is not desc.dtype or obj.shape != desc.shape or not obj.flags.c_contiguous \
                or not obj.flags.writeable:
            raise FrameError(f"destination is {obj.dtype} {list(obj.shape)}, frame has "
                             f"{desc.dtype.name} {list(desc.shape)}")
        return memoryview(obj.reshape(-1).view(np.uint8))
    mv = memoryview(obj).cast("B")
    if mv.readonly or mv.nbytes != desc.byte_length:
        raise FrameError(f"destination buffer of {mv.nbytes} bytes, frame tensor has {desc.byte_length}")
    return mv

