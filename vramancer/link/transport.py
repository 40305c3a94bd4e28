"""One interface for every Link transport, and the registry of transports.

    conn = make_transport("tcp", trusted_network=False).connect(("127.0.0.1", 5000))
    conn.send([hidden_states, attention_mask], stream_id=3)
    frame = peer.recv(factory=torch_buffers)          # or into=[preallocated, ...]

A :class:`Connection` sends and receives frames (vramancer/link/frame.py); a :class:`Listener`
accepts connections. :class:`StreamConnection` carries frames over a byte stream (TCP or TLS
socket): scatter-gather ``sendmsg`` of the header and the tensors' own buffers (TLS: one write
per buffer), ``recv_into`` straight into the destination. Any refused or broken frame closes the
connection, is logged with its reason on the ``vramancer.link`` logger, and raises ``LinkError``.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .errors import FrameError, LinkError
from .frame import (
    HEADER,
    HEADER_BYTES,
    MAGIC,
    VERSION,
    BufferFactory,
    FrameHeader,
    FrameReader,
    FrameType,
    FrameWriter,
    Limits,
    TensorDesc,
    as_payload,
    dest_view,
    numpy_buffers,
    torch_array,
)

__all__ = [
    "Frame",
    "Connection",
    "Listener",
    "Transport",
    "StreamConnection",
    "TRANSPORTS",
    "transport_class",
    "make_transport",
    "fast_path",
    "hot_path_name",
    "log",
]

log = logging.getLogger("vramancer.link")

# name -> (module, class): the torch.distributed transport imports torch, so classes load on demand
TRANSPORTS: dict[str, tuple[str, str]] = {
    "tcp": ("vramancer.link.tcp", "TcpTransport"),
    "tls": ("vramancer.link.tls", "TlsTransport"),
    "shm": ("vramancer.link.shm", "ShmTransport"),
    "torch": ("vramancer.link.dist", "TorchDistTransport"),
}

_IOV_MAX = 512
_COALESCE_BYTES = 64 * 1024  # TLS: frames this small go out as one record
_STAGE_BYTES = 64 * 1024     # receive read-ahead: header, descriptors and small payloads in one syscall
_CACHED_LAYOUTS = 64         # send: encoded header + descriptors kept per connection, by dtypes and shapes
_CACHED_DESC_BYTES = 1024    # receive: descriptor blocks up to this size are matched against validated ones
_ndarray = np.ndarray
_TENSORS = FrameType.TENSORS
_PREFIX = HEADER.pack(MAGIC, VERSION, 1, 0, 0, 0, 0, 0, 0, 0)[:8]   # magic, version, TENSORS, no flags
_STREAM_SEQ = struct.Struct("<IQ")         # header bytes 8..20: the only ones that differ between frames of a layout
_pack_stream_seq = _STREAM_SEQ.pack_into
_TAIL_HEAD = struct.Struct("<HHIQ")        # header bytes 20..36: count, reserved, descriptor bytes, payload bytes
_NO_TX = (None, None, b"", 0)              # (dtype, shape, header + descriptors, frame bytes) of the last send
_C_FAMILIES = {socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", socket.AF_INET)}


@dataclass(slots=True)
class Frame:
    frame_type: FrameType
    stream_id: int
    seq: int
    descs: list[TensorDesc] = field(default_factory=list)
    tensors: list[Any] = field(default_factory=list)


def _load_fast_path() -> Any:
    """The compiled steady state of StreamConnection (vramancer/link/_fastlink.c), or None: not built
    (no compiler at install time) or VRAMANCER_LINK_PYTHON=1 in the environment. Connections made while
    this module's ``fast_path`` is None run every step in Python."""
    from .. import envs

    if envs.get("VRAMANCER_LINK_PYTHON"):
        return None
    try:
        from . import _fastlink
    except ImportError:
        return None
    _fastlink.setup(np.ndarray, Frame, FrameType.TENSORS)
    return _fastlink


fast_path: Any = _load_fast_path()


def hot_path_name() -> str:
    """Which steady state new plain stream connections (TCP, shm control) run: "C" or "Python"."""
    return "C" if fast_path is not None else "Python"


class _PyStream:
    """StreamConnection's base without the compiled module: send and recv are the Python methods."""


class Connection(ABC):
    """A bidirectional frame channel to one peer."""

    name = "?"

    def __init__(self, limits: Limits | None = None) -> None:
        self.writer = FrameWriter()
        self.reader = FrameReader(limits)
        self.closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    @abstractmethod
    def send(self, tensors: Sequence[Any], stream_id: int = 0) -> int:
        """Send one TENSORS frame; returns its size in bytes."""

    @abstractmethod
    def recv(self, into: Sequence[Any] | None = None, factory: BufferFactory | None = None) -> Frame:
        """Receive one frame into ``into`` (caller-given destinations) or buffers from ``factory``."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse(self, reason: str, exc_type: type[LinkError] = FrameError) -> LinkError:
        log.warning("link %s: closing connection: %s", self.name, reason)
        self.close()
        return exc_type(reason)

    def _destinations(self, descs: list[TensorDesc], into: Sequence[Any] | None,
                      factory: BufferFactory | None) -> tuple[list[Any], list[memoryview]]:
        """Destinations of every tensor, checked (``into``) or allocated (``factory``) only now,
        after the whole header and every descriptor passed validation."""
        if into is not None:
            if len(into) != len(descs):
                raise FrameError(f"frame has {len(descs)} tensors, {len(into)} destinations given")
            return list(into), [dest_view(obj, d) for obj, d in zip(into, descs)]
        make = factory or numpy_buffers
        objs, views = [], []
        for d in descs:
            obj, mv = make(d)
            if mv.nbytes != d.byte_length:
                raise FrameError(f"buffer factory gave {mv.nbytes} bytes for a {d.byte_length}-byte tensor")
            objs.append(obj)
            views.append(mv)
        return objs, views


class Listener(ABC):
    @abstractmethod
    def accept(self, timeout: float | None = None) -> Connection: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Transport(ABC):
    name = "?"

    @abstractmethod
    def connect(self, address: Any, timeout: float | None = 30.0) -> Connection: ...

    @abstractmethod
    def listen(self, address: Any) -> Listener: ...


def transport_class(name: str) -> type[Transport]:
    if name not in TRANSPORTS:
        raise LinkError(f"unknown transport {name!r} (known: {', '.join(TRANSPORTS)})")
    module, cls = TRANSPORTS[name]
    return getattr(importlib.import_module(module), cls)


def make_transport(name: str, **options: Any) -> Transport:
    return transport_class(name)(**options)


class _RxLayout(NamedTuple):
    """A layout (tensor count, descriptor block, payload bytes) a StreamConnection has validated.
    ``unpack`` reads a staged frame's first 8 header bytes, stream, sequence and the rest of its header
    with its descriptors (``tail``) in one call; ``np_dtype``/``shape``/``cast``: a single numpy
    destination's expected dtype (None: no numpy fast path) and shape, and whether its byte view
    needs a cast to bytes."""

    unpack: Any
    head_bytes: int
    tail: bytes
    descs: tuple[TensorDesc, ...]
    payload_bytes: int
    np_dtype: Any
    shape: tuple[int, ...]
    cast: bool


def _rx_layout_of(tail: bytes, descs: tuple[TensorDesc, ...], payload_bytes: int) -> _RxLayout:
    np_dtype, shape, cast = None, (), True
    if len(descs) == 1 and payload_bytes and descs[0].dtype.numpy is not None:
        np_dtype, shape = np.dtype(descs[0].dtype.numpy), descs[0].shape
        cast = not (np_dtype == np.uint8 and len(shape) == 1)
    return _RxLayout(struct.Struct(f"<8sIQ{len(tail)}s").unpack_from, 20 + len(tail), tail, descs, payload_bytes,
                     np_dtype, shape, cast)


class StreamConnection(fast_path.Stream if fast_path is not None else _PyStream, Connection):  # type: ignore[misc]
    """Frames over a connected stream socket (plain or ssl-wrapped).

    Sending: one ``sendmsg`` of [header + descriptors, each tensor's own buffer] (TLS: one record
    for small frames). The header and descriptor bytes of each tensor layout (dtypes and shapes)
    are encoded once and kept per connection; a frame only packs its stream, sequence and sizes.

    Receiving: a staging buffer holds whatever the socket has (a whole small frame, or the next
    one, in one ``recv_into``); header and descriptors are validated where they lie, descriptors
    through the reader's cache of blocks it has already validated. Payloads go to their destination
    from the staging buffer, or with ``recv_into`` straight into it when large.

    ``send`` and ``recv`` are ``_send_py`` and ``_recv_py``, or, where vramancer/link/_fastlink.c is
    built, the compiled base class's: the same steady state (the frames above) in C, with small frames
    read by one ``recvmsg`` into [staging, destination, staging]; everything else goes to the Python
    methods. Plain sockets only (not TLS); ``hot_path_name()`` says which one new connections run.
    """

    def __init__(self, sock: socket.socket, limits: Limits | None = None, name: str = "tcp") -> None:
        super().__init__(limits)
        self.sock = sock
        self.name = name
        lim = self.reader.limits
        # header + every descriptor block the limits allow fits in the staging buffer
        self._cap = max(_STAGE_BYTES, HEADER_BYTES + lim.max_desc_bytes(lim.max_tensors))
        self._stage = bytearray(self._cap)
        self._stage_mv = memoryview(self._stage)
        self._lo = self._hi = 0
        self._mid_frame = False
        self._scatter = hasattr(sock, "sendmsg") and not _is_ssl(sock)
        self._layouts: dict[tuple, tuple[bytearray, int, int, int]] = {}
        self._tx: tuple = _NO_TX                      # send fast path: the last single-array layout
        self._rx: _RxLayout | None = None             # receive fast path: the last validated layout
        self._rx_layouts: dict[bytes, _RxLayout] = {}
        self._next_seq = self.writer._next            # the compiled send numbers frames in the writer's dict
        self._fd = sock.fileno() if fast_path is not None and self._scatter and sock.family in _C_FAMILIES else -1

    # -- sending ---------------------------------------------------------------------------------
    def _send_py(self, tensors: Sequence[Any], stream_id: int = 0) -> int:
        # steady state: one C-contiguous numpy array of the previous frame's dtype and shape, on a stream
        # used before: only the stream and sequence number are packed into the layout's encoded header
        if len(tensors) == 1:
            t = tensors[0]
            tx = self._tx
            if type(t) is _ndarray and t.dtype is tx[0] and t.shape == tx[1] and t.flags.c_contiguous \
                    and not self.closed:
                nxt = self.writer._next
                seq = nxt.get(stream_id)
                if seq is not None:
                    nxt[stream_id] = seq + 1
                    head = tx[2]
                    _pack_stream_seq(head, 8, stream_id, seq)
                    total = tx[3]
                    if not self._scatter:
                        self._write([head, t], total)
                        return total
                    try:
                        n = self.sock.sendmsg([head, t])
                        if n != total:
                            self._sendmsg_rest([head, t], n)
                    except (OSError, ValueError) as e:
                        self.close()
                        raise LinkError(f"link {self.name}: send failed: {e}") from None
                    self.bytes_sent += total
                    return total
        return self._send_any(tensors, stream_id)

    def _send_any(self, tensors: Sequence[Any], stream_id: int) -> int:
        if self.closed:
            raise LinkError(f"link {self.name}: connection is closed")
        # a layout key per tensor: (dtype, shape) of a numpy array or CPU torch tensor sent from its own
        # bytes (C-contiguous), else the descriptor of as_payload's contiguous host copy
        if len(tensors) == 1 and type(tensors[0]) is _ndarray and tensors[0].flags.c_contiguous:
            t = tensors[0]
            key: tuple = ((t.dtype, t.shape),)
            bufs: list[Any] = [None, t]
        else:
            parts = []
            bufs = [None]
            for t in tensors:
                if type(t) is _ndarray:
                    if t.flags.c_contiguous:
                        parts.append((t.dtype, t.shape))
                        bufs.append(t)
                        continue
                else:
                    arr = torch_array(t)
                    if arr is not None:
                        parts.append((t.dtype, t.shape))
                        bufs.append(arr)
                        continue
                desc, mv, _ = as_payload(t)
                parts.append(desc)
                bufs.append(mv)
            key = tuple(parts)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layout(key, tensors)
        head, count, desc_bytes, payload_bytes = layout
        HEADER.pack_into(head, 0, MAGIC, VERSION, 1, 0, stream_id, self.writer.next_seq(stream_id), count, 0,
                         desc_bytes, payload_bytes)
        bufs[0] = head
        total = HEADER_BYTES + desc_bytes + payload_bytes
        if len(key) == 1 and type(key[0]) is tuple and type(tensors[0]) is _ndarray:
            self._tx = (key[0][0], key[0][1], head, total)
        if self._scatter and len(bufs) <= _IOV_MAX:
            try:
                n = self.sock.sendmsg(bufs)
                if n != total:
                    self._sendmsg_rest(bufs, n)
            except (OSError, ValueError) as e:
                self.close()
                raise LinkError(f"link {self.name}: send failed: {e}") from None
            self.bytes_sent += total
        else:
            self._write(bufs, total)
        return total

    def _layout(self, key: tuple, tensors: Sequence[Any]) -> tuple[bytearray, int, int, int]:
        descs = [k if isinstance(k, TensorDesc) else as_payload(t)[0] for k, t in zip(key, tensors)]
        blob = b"".join([d.encode() for d in descs])
        head = bytearray(HEADER_BYTES + len(blob))
        head[HEADER_BYTES:] = blob
        layout = (head, len(descs), len(blob), sum(d.byte_length for d in descs))
        if len(self._layouts) >= _CACHED_LAYOUTS:
            self._layouts.clear()
        self._layouts[key] = layout
        return layout

    def send_control(self, frame_type: FrameType, stream_id: int = 0) -> None:
        head = self.writer.header(frame_type, [], stream_id)
        self._write([head], len(head))

    def _write(self, bufs: list[Any], total: int) -> None:
        if self.closed:
            raise LinkError(f"link {self.name}: connection is closed")
        try:
            if self._scatter:
                n = self.sock.sendmsg(bufs) if len(bufs) <= _IOV_MAX else 0
                if n != total:
                    self._sendmsg_rest(bufs, n)
            elif total <= _COALESCE_BYTES:
                self.sock.sendall(b"".join(bufs))
            else:
                for b in bufs:
                    mv = memoryview(b)
                    if mv.nbytes:
                        self.sock.sendall(mv)
        except (OSError, ValueError) as e:
            self.close()
            raise LinkError(f"link {self.name}: send failed: {e}") from None
        self.bytes_sent += total

    def _sendmsg_rest(self, bufs: list[Any], sent: int) -> None:
        """Finish a partly sent ``sendmsg`` (``sent`` bytes went out)."""
        pending = [v for v in (memoryview(b).cast("B") if memoryview(b).nbytes else None for b in bufs) if v]
        while True:
            while sent:
                if sent >= pending[0].nbytes:
                    sent -= pending[0].nbytes
                    pending.pop(0)
                else:
                    pending[0] = pending[0][sent:]
                    sent = 0
            if not pending:
                return
            sent = self.sock.sendmsg(pending[:_IOV_MAX])

    # -- receiving -------------------------------------------------------------------------------
    def _fill(self, n: int) -> int:
        """At least ``n`` (<= the staging size) bytes staged from ``_lo``; returns ``_lo``."""
        lo, hi = self._lo, self._hi
        if lo == hi:
            lo = hi = 0
        elif self._cap - lo < n:
            self._stage[:hi - lo] = self._stage[lo:hi]
            lo, hi = 0, hi - lo
        try:
            while hi - lo < n:
                k = self.sock.recv_into(self._stage_mv[hi:], self._cap - hi)
                if k == 0:
                    raise LinkError(f"link {self.name}: peer closed the connection mid-frame"
                                    if self._mid_frame or hi > lo else f"link {self.name}: peer closed the connection")
                hi += k
        except LinkError:
            self.close()
            raise
        except (OSError, ValueError) as e:
            self.close()
            raise LinkError(f"link {self.name}: receive failed: {e}") from None
        finally:
            self._lo, self._hi = lo, hi
        return lo

    def _read_into(self, mv: memoryview) -> None:
        """Fill ``mv``: first from bytes already staged, then small remainders through the staging
        buffer (one syscall can bring a whole small frame, or the next one), large ones straight
        into ``mv`` with recv_into."""
        n_total = mv.nbytes
        lo = self._lo
        staged = self._hi - lo
        if staged >= n_total:
            mv[:] = self._stage_mv[lo:lo + n_total]
            self._lo = lo + n_total
            self.bytes_received += n_total
            return
        if staged:
            mv[:staged] = self._stage_mv[lo:self._hi]
        self._lo = self._hi = 0
        got = staged
        try:
            while got < n_total:
                want = n_total - got
                if want >= _STAGE_BYTES // 2:
                    n = self.sock.recv_into(mv[got:], want)
                    got += n
                else:
                    n = self.sock.recv_into(self._stage_mv, self._cap)
                    k = min(n, want)
                    mv[got:got + k] = self._stage_mv[:k]
                    got += k
                    self._lo, self._hi = k, n
                if n == 0:
                    raise LinkError(f"link {self.name}: peer closed the connection mid-frame")
        except LinkError:
            self.close()
            raise
        except (OSError, ValueError) as e:
            self.close()
            raise LinkError(f"link {self.name}: receive failed: {e}") from None
        self.bytes_received += n_total

    def read_header(self) -> tuple[FrameHeader, list[TensorDesc]]:
        """The next frame's header and descriptors, validated (the payload is left to read)."""
        if self.closed:
            raise LinkError(f"link {self.name}: connection is closed")
        self._mid_frame = False
        lo = self._fill(HEADER_BYTES)
        self._mid_frame = True
        try:
            head = self.reader.parse_header(self._stage_mv[lo:lo + HEADER_BYTES])
        except FrameError as e:
            raise self._refuse(str(e)) from None
        self._lo = lo + HEADER_BYTES
        self.bytes_received += HEADER_BYTES
        n = head.desc_bytes
        if n <= self._cap:
            lo = self._fill(n)
            blob: Any = bytes(self._stage_mv[lo:lo + n])
            self._lo = lo + n
            self.bytes_received += n
        else:  # limits larger than this connection's staging buffer (bounded by those limits)
            blob = bytearray(n)
            self._read_into(memoryview(blob))
        try:
            descs = self.reader.parse_descriptors(head, blob)
        except FrameError as e:
            raise self._refuse(str(e)) from None
        return head, descs

    def _recv_py(self, into: Sequence[Any] | None = None, factory: BufferFactory | None = None) -> Frame:
        if self.closed:
            raise LinkError(f"link {self.name}: connection is closed")
        lo, hi = self._lo, self._hi
        if hi - lo < HEADER_BYTES:
            if lo == hi:                                   # nothing staged: one read into the whole buffer
                try:
                    hi = self.sock.recv_into(self._stage_mv)
                except (OSError, ValueError) as e:
                    self._lo = self._hi = 0
                    self.close()
                    raise LinkError(f"link {self.name}: receive failed: {e}") from None
                lo = self._lo = 0
                self._hi = hi
                if hi == 0:
                    self.close()
                    raise LinkError(f"link {self.name}: peer closed the connection")
            if hi - lo < HEADER_BYTES:
                self._mid_frame = False
                lo = self._fill(HEADER_BYTES)
                hi = self._hi
        rx = self._rx
        if rx is not None:
            # steady state: the header but its stream and sequence, and the descriptors, equal byte for byte
            # those of a frame validated before; the stream is known, its sequence number must grow
            unpack, head_bytes, tail, descs, payload_bytes, np_dtype, shape, cast = rx
            if hi - lo >= head_bytes:
                prefix, stream_id, seq, got = unpack(self._stage_mv, lo)
                if got == tail and prefix == _PREFIX:
                    last_seq = self.reader.last_seq
                    last = last_seq.get(stream_id)
                    if last is not None and seq > last:
                        lo += head_bytes
                        if np_dtype is not None and into is not None and len(into) == 1:
                            d = into[0]                    # one numpy destination: dtype, shape, layout checked
                            if type(d) is _ndarray and d.dtype is np_dtype and d.shape == shape:
                                mv = memoryview(d)
                                if not mv.readonly and mv.c_contiguous:
                                    if cast:
                                        mv = mv.cast("B")
                                    end = lo + payload_bytes
                                    if hi >= end:          # staged already (small frames)
                                        mv[:] = self._stage_mv[lo:end]
                                        self._lo = end
                                        self.bytes_received += head_bytes + payload_bytes
                                    else:
                                        self._lo = lo
                                        self.bytes_received += head_bytes
                                        self._read_into(mv)
                                    last_seq[stream_id] = seq
                                    return Frame(_TENSORS, stream_id, seq, list(descs), [d])
                        self._lo = lo
                        self.bytes_received += head_bytes
                        return self._recv_known(descs, stream_id, seq, into, factory)
        reader = self.reader
        known = reader.known_frame(self._stage_mv, lo, self._hi)
        if known is None:                                  # the general path: every check, by name
            head, descs = self.read_header()
            if head.frame_type != FrameType.TENSORS:
                reader.accept(head)
                if head.frame_type == FrameType.CLOSE:
                    self.close()
                return Frame(head.frame_type, head.stream_id, head.seq)
            if head.desc_bytes <= _CACHED_DESC_BYTES:      # the layout's bytes, as the fast path compares them
                tail = _TAIL_HEAD.pack(head.count, 0, head.desc_bytes, head.payload_bytes) \
                    + b"".join([d.encode() for d in descs])
                self._rx = self._rx_layout(tail, descs, head.payload_bytes)
            stream_id, seq = head.stream_id, head.seq
        else:
            descs, stream_id, seq, end = known
            self._rx = self._rx_layout(bytes(self._stage_mv[lo + 20:end]), descs, None)
            self._mid_frame = True
            self.bytes_received += end - lo
            self._lo = end
        try:
            objs, views = self._destinations(descs, into, factory)
        except FrameError as e:
            raise self._refuse(str(e)) from None
        self._read_payloads(views)
        reader.last_seq[stream_id] = seq
        return Frame(_TENSORS, stream_id, seq, descs, objs)

    if fast_path is None:
        send = _send_py
        recv = _recv_py

    def _c_rest(self, status: int, rx: _RxLayout, d: np.ndarray, stream_id: int, seq: int, got: int) -> Frame:
        """After the compiled receive took a frame's header and ``got`` bytes of its payload: the rest
        (status 2: the socket would block, or a signal came), the peer's close (3) or a failed read
        (-errno). Bytes are counted as the Python path counts them."""
        self._mid_frame = True
        self.bytes_received += rx.head_bytes
        if status == 3:
            self.close()
            raise LinkError(f"link {self.name}: peer closed the connection mid-frame")
        if status < 0:
            self._c_error("receive", -status)
        mv = memoryview(d)
        if rx.cast:
            mv = mv.cast("B")
        self._read_into(mv[got:])
        self.bytes_received += got
        self.reader.last_seq[stream_id] = seq
        return Frame(_TENSORS, stream_id, seq, list(rx.descs), [d])

    def _c_error(self, what: str, err: int) -> None:
        """A failed send or receive in the compiled path: closes, raises LinkError as the Python path does."""
        self.close()
        raise LinkError(f"link {self.name}: {what} failed: {OSError(err, os.strerror(err))}")

    def _recv_known(self, layout: tuple[TensorDesc, ...], stream_id: int, seq: int, into: Sequence[Any] | None,
                    factory: BufferFactory | None) -> Frame:
        """The payload of a frame whose header and descriptors (``layout``) passed the fast path."""
        self._mid_frame = True
        descs = list(layout)
        try:
            objs, views = self._destinations(descs, into, factory)
        except FrameError as e:
            raise self._refuse(str(e)) from None
        self._read_payloads(views)
        self.reader.last_seq[stream_id] = seq
        return Frame(_TENSORS, stream_id, seq, descs, objs)

    def _read_payloads(self, views: list[memoryview]) -> None:
        for mv in views:
            n = mv.nbytes
            lo = self._lo
            if self._hi - lo >= n:                           # staged already (small frames)
                mv[:] = self._stage_mv[lo:lo + n]
                self._lo = lo + n
                self.bytes_received += n
            elif n:
                self._read_into(mv)

    def _rx_layout(self, tail: bytes, descs: list[TensorDesc], payload_bytes: int | None) -> _RxLayout:
        """The receive fast path's record of a validated layout: header bytes 20.. (count, descriptor and
        payload bytes) and the descriptor block, ``tail`` (kept per connection, 64 at most)."""
        rx = self._rx_layouts.get(tail)
        if rx is None:
            if payload_bytes is None:
                payload_bytes = sum(d.byte_length for d in descs)
            if len(self._rx_layouts) >= _CACHED_LAYOUTS:
                self._rx_layouts.clear()
            rx = self._rx_layouts[tail] = _rx_layout_of(tail, tuple(descs), payload_bytes)
        return rx

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fd = -1
        try:
            self.sock.close()
        except OSError:
            pass


def _is_ssl(sock: Any) -> bool:
    import ssl

    return isinstance(sock, ssl.SSLSocket)
