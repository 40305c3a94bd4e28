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
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import FrameError, LinkError
from .frame import (
    HEADER_BYTES,
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


@dataclass
class Frame:
    frame_type: FrameType
    stream_id: int
    seq: int
    descs: list[TensorDesc] = field(default_factory=list)
    tensors: list[Any] = field(default_factory=list)


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


class StreamConnection(Connection):
    """Frames over a connected stream socket (plain or ssl-wrapped)."""

    def __init__(self, sock: socket.socket, limits: Limits | None = None, name: str = "tcp") -> None:
        super().__init__(limits)
        self.sock = sock
        self.name = name
        self._head = bytearray(HEADER_BYTES)
        self._stage_mv = memoryview(bytearray(_STAGE_BYTES))
        self._lo = self._hi = 0
        self._mid_frame = False
        self._scatter = hasattr(sock, "sendmsg") and not _is_ssl(sock)

    # -- sending ---------------------------------------------------------------------------------
    def send(self, tensors: Sequence[Any], stream_id: int = 0) -> int:
        payloads = [as_payload(t) for t in tensors]
        head = self.writer.header(FrameType.TENSORS, [p[0] for p in payloads], stream_id)
        views = [memoryview(head)] + [p[1] for p in payloads if p[1].nbytes]
        return self._write(views)

    def send_control(self, frame_type: FrameType, stream_id: int = 0) -> None:
        self._write([memoryview(self.writer.header(frame_type, [], stream_id))])

    def _write(self, views: list[memoryview]) -> int:
        if self.closed:
            raise LinkError(f"link {self.name}: connection is closed")
        total = sum(v.nbytes for v in views)
        try:
            if self._scatter:
                self._sendmsg_all(views)
            elif total <= _COALESCE_BYTES:
                self.sock.sendall(b"".join(views))
            else:
                for v in views:
                    self.sock.sendall(v)
        except (OSError, ValueError) as e:
            self.close()
            raise LinkError(f"link {self.name}: send failed: {e}") from None
        self.bytes_sent += total
        return total

    def _sendmsg_all(self, views: list[memoryview]) -> None:
        pending = [v for v in views if v.nbytes]
        while pending:
            n = self.sock.sendmsg(pending[:_IOV_MAX])
            while n:
                if n >= pending[0].nbytes:
                    n -= pending[0].nbytes
                    pending.pop(0)
                else:
                    pending[0] = pending[0][n:]
                    n = 0

    # -- receiving -------------------------------------------------------------------------------
    def _read_into(self, mv: memoryview) -> None:
        """Fill ``mv``: first from bytes already staged, then small remainders through the staging
        buffer (one syscall can bring a whole small frame, or the next one), large ones straight
        into ``mv`` with recv_into."""
        n_total = mv.nbytes
        got = 0
        try:
            while got < n_total:
                staged = self._hi - self._lo
                if staged:
                    k = min(staged, n_total - got)
                    mv[got:got + k] = self._stage_mv[self._lo:self._lo + k]
                    self._lo += k
                    got += k
                    continue
                want = n_total - got
                if want >= _STAGE_BYTES // 2:
                    n = self.sock.recv_into(mv[got:], want)
                    got += n
                else:
                    n = self.sock.recv_into(self._stage_mv, _STAGE_BYTES)
                    self._lo, self._hi = 0, n
                if n == 0:
                    raise LinkError(f"link {self.name}: peer closed the connection mid-frame"
                                    if got or self._mid_frame else f"link {self.name}: peer closed the connection")
        except LinkError:
            self.close()
            raise
        except (OSError, ValueError) as e:
            self.close()
            raise LinkError(f"link {self.name}: receive failed: {e}") from None
        self.bytes_received += n_total

    def read_header(self) -> tuple[FrameHeader, list[TensorDesc]]:
        if self.closed:
            raise LinkError(f"link {self.name}: connection is closed")
        self._mid_frame = False
        self._read_into(memoryview(self._head))
        self._mid_frame = True
        try:
            head = self.reader.parse_header(self._head)
        except FrameError as e:
            raise self._refuse(str(e)) from None
        desc_buf = bytearray(head.desc_bytes)  # bounded by Limits.max_desc_bytes(max_tensors)
        if head.desc_bytes:
            self._read_into(memoryview(desc_buf))
        try:
            descs = self.reader.parse_descriptors(head, desc_buf)
        except FrameError as e:
            raise self._refuse(str(e)) from None
        return head, descs

    def recv(self, into: Sequence[Any] | None = None, factory: BufferFactory | None = None) -> Frame:
        head, descs = self.read_header()
        if head.frame_type != FrameType.TENSORS:
            self.reader.accept(head)
            if head.frame_type == FrameType.CLOSE:
                self.close()
            return Frame(head.frame_type, head.stream_id, head.seq)
        try:
            objs, views = self._destinations(descs, into, factory)
        except FrameError as e:
            raise self._refuse(str(e)) from None
        for mv in views:
            if mv.nbytes:
                self._read_into(mv)
        self.reader.accept(head)
        return Frame(head.frame_type, head.stream_id, head.seq, descs, objs)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def _is_ssl(sock: Any) -> bool:
    import ssl

    return isinstance(sock, ssl.SSLSocket)
