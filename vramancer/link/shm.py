"""Shared-memory transport between processes of one host.

Each direction of a connection has its own segment, made by the sender
(``multiprocessing.shared_memory``, ``slots`` x ``slot_bytes``, default 2 x 64 MiB: a double buffer),
and its own Unix socket as the control channel:

    sender                                            receiver
    waits for a free slot (an ack on the control socket)
    copies each tensor's bytes into the slot
    sends header + descriptors + slot index (u32)  ->  validates header and descriptors (frame.py)
                                                       allocates / checks the destinations
                                                       copies from the slot into them
                                               <-  ack b"VRMA" + slot index (u32)

Set-up over the listener's Unix socket path: the dialer opens two Unix connections (one per
direction, paired by a token); each side sends b"VRMS" | slots u32 | slot bytes u64 | name length
u16 | segment name, the peer maps that segment and answers b"\\x01", and the creator unlinks the
name at once (the mapping lives on in both processes; nothing is left in /dev/shm after a crash).
Unix sockets only reach processes of this host, so there is no plaintext-over-network case.
"""
from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Sequence
from multiprocessing import shared_memory
from typing import Any

from .errors import FrameError, LinkError
from .frame import BufferFactory, FrameType, Limits, as_payload
from .tcp import recv_exact
from .transport import Connection, Frame, Listener, StreamConnection, Transport

__all__ = ["ShmTransport", "ShmListener", "ShmConnection"]

_SEG = struct.Struct("<4sIQH")
_ACK = struct.Struct("<4sI")
_SLOT = struct.Struct("<I")
_OPEN = struct.Struct("<4sB16s")  # b"VRMO" | direction 0 (first connection) or 1 (second) | token


def _recv_control(sock: socket.socket, n: int) -> bytes:
    return recv_exact(sock, n, "shm: peer closed the control channel")


def _untrack(seg: shared_memory.SharedMemory) -> None:
    """Python < 3.13 registers every segment, made or mapped, with the resource tracker (shared by
    a parent and its multiprocessing children), which unlinks or complains at exit. The Link owns
    its segments' lifetime (the creator unlinks right after the peer mapped it): unregister at once."""
    if sys.version_info < (3, 13):
        from multiprocessing import resource_tracker

        resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001


def _create(size: int) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(create=True, size=size, track=False)
    seg = shared_memory.SharedMemory(create=True, size=size)
    _untrack(seg)
    return seg


def _unlink(seg: shared_memory.SharedMemory) -> None:
    if sys.version_info >= (3, 13):
        seg.unlink()
    else:  # SharedMemory.unlink would unregister a second time
        from multiprocessing import shared_memory as _sm

        _sm._posixshmem.shm_unlink(seg._name)  # noqa: SLF001


def _attach(name: str) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    seg = shared_memory.SharedMemory(name=name)
    _untrack(seg)
    return seg


class _Pipe:
    """One direction: ``tx`` (our segment, we send) or ``rx`` (peer's segment, we receive)."""

    def __init__(self, sock: socket.socket, seg: shared_memory.SharedMemory, slots: int, slot_bytes: int) -> None:
        self.sock = sock
        self.seg = seg
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.free = list(range(slots))


def _offer(sock: socket.socket, slots: int, slot_bytes: int) -> shared_memory.SharedMemory:
    seg = _create(slots * slot_bytes)
    name = seg.name.encode()
    try:
        sock.sendall(_SEG.pack(b"VRMS", slots, slot_bytes, len(name)) + name)
        if _recv_control(sock, 1) != b"\x01":
            raise LinkError("shm: peer did not map the segment")
    finally:
        _unlink(seg)
    return seg


def _take(sock: socket.socket, max_bytes: int) -> tuple[shared_memory.SharedMemory, int, int]:
    magic, slots, slot_bytes, name_len = _SEG.unpack(_recv_control(sock, _SEG.size))
    if magic != b"VRMS" or not 1 <= slots <= 64 or slots * slot_bytes > max_bytes or name_len > 255:
        raise LinkError(f"shm: bad segment offer ({slots} x {slot_bytes} bytes)")
    seg = _attach(_recv_control(sock, name_len).decode())
    if seg.size < slots * slot_bytes:
        seg.close()
        raise LinkError("shm: segment smaller than announced")
    sock.sendall(b"\x01")
    return seg, slots, slot_bytes


class ShmConnection(Connection):
    name = "shm"

    def __init__(self, tx_sock: socket.socket, rx_sock: socket.socket, slots: int, slot_bytes: int,
                 limits: Limits | None, dialer: bool) -> None:
        super().__init__(limits)
        lim = self.reader.limits
        try:
            # offer ours then take theirs on one socket each; the dialer offers first on tx
            if dialer:
                tx_seg = _offer(tx_sock, slots, slot_bytes)
                rx_seg, rs, rb = _take(rx_sock, lim.max_frame_bytes * 64)
            else:
                rx_seg, rs, rb = _take(rx_sock, lim.max_frame_bytes * 64)
                tx_seg = _offer(tx_sock, slots, slot_bytes)
        except (OSError, ValueError) as e:
            tx_sock.close()
            rx_sock.close()
            raise LinkError(f"shm: set-up failed: {e}") from None
        self.tx = _Pipe(tx_sock, tx_seg, slots, slot_bytes)
        self.rx = _Pipe(rx_sock, rx_seg, rs, rb)
        self._rx_stream = StreamConnection(rx_sock, limits, "shm")
        self._rx_stream.reader = self.reader

    def send(self, tensors: Sequence[Any], stream_id: int = 0) -> int:
        if self.closed:
            raise LinkError("link shm: connection is closed")
        payloads = [as_payload(t) for t in tensors]
        total = sum(p[0].byte_length for p in payloads)
        if total > self.tx.slot_bytes:
            raise FrameError(f"frame payload of {total} bytes over the shm slot of {self.tx.slot_bytes} bytes")
        try:
            while not self.tx.free:
                magic, slot = _ACK.unpack(_recv_control(self.tx.sock, _ACK.size))
                if magic != b"VRMA" or slot >= self.tx.slots:
                    raise self._refuse(f"bad ack on the control channel (slot {slot})", LinkError)
                self.tx.free.append(slot)
            slot = self.tx.free.pop(0)
            off = slot * self.tx.slot_bytes
            buf = self.tx.seg.buf
            for _, mv, _keep in payloads:
                n = mv.nbytes
                buf[off:off + n] = mv
                off += n
            head = self.writer.header(FrameType.TENSORS, [p[0] for p in payloads], stream_id)
            self.tx.sock.sendall(head + _SLOT.pack(slot))
        except OSError as e:
            self.close()
            raise LinkError(f"link shm: send failed: {e}") from None
        self.bytes_sent += total
        return len(head) + total

    def recv(self, into: Sequence[Any] | None = None, factory: BufferFactory | None = None) -> Frame:
        head, descs = self._rx_stream.read_header()
        if head.frame_type != FrameType.TENSORS:
            self.reader.accept(head)
            if head.frame_type == FrameType.CLOSE:
                self.close()
            return Frame(head.frame_type, head.stream_id, head.seq)
        slot_buf = bytearray(_SLOT.size)
        try:
            self._rx_stream._read_into(memoryview(slot_buf))   # through its read-ahead, like the header
        except LinkError:
            self.close()
            raise
        (slot,) = _SLOT.unpack(slot_buf)
        if slot >= self.rx.slots or head.payload_bytes > self.rx.slot_bytes:
            raise self._refuse(f"slot {slot} / {head.payload_bytes} bytes outside the peer's "
                               f"{self.rx.slots} x {self.rx.slot_bytes}-byte segment")
        try:
            objs, views = self._destinations(descs, into, factory)
        except FrameError as e:
            raise self._refuse(str(e)) from None
        off = slot * self.rx.slot_bytes
        buf = self.rx.seg.buf
        for mv in views:
            n = mv.nbytes
            if n:
                mv[:] = buf[off:off + n]
            off += n
        self.reader.accept(head)
        try:
            self.rx.sock.sendall(_ACK.pack(b"VRMA", slot))
        except OSError:  # the peer is gone after sending: this frame is whole, the next call says so
            self.close()
        self.bytes_received += head.payload_bytes
        return Frame(head.frame_type, head.stream_id, head.seq, descs, objs)

    def send_control(self, frame_type: FrameType, stream_id: int = 0) -> None:
        self.tx.sock.sendall(self.writer.header(frame_type, [], stream_id))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pipe in (getattr(self, "tx", None), getattr(self, "rx", None)):
            if pipe is None:
                continue
            try:
                pipe.sock.close()
                pipe.seg.close()
            except (OSError, BufferError):
                pass


class ShmListener(Listener):
    def __init__(self, sock: socket.socket, path: str, transport: ShmTransport) -> None:
        self.sock = sock
        self.path = path
        self.transport = transport
        self._pending: dict[bytes, socket.socket] = {}

    @property
    def address(self) -> str:
        return self.path

    def accept(self, timeout: float | None = None) -> ShmConnection:
        self.sock.settimeout(timeout)
        while True:
            try:
                conn, _ = self.sock.accept()
                conn.settimeout(timeout)
                magic, direction, token = _OPEN.unpack(_recv_control(conn, _OPEN.size))
            except (OSError, LinkError) as e:
                raise LinkError(f"shm accept failed: {e}") from None
            if magic != b"VRMO" or direction > 1:
                conn.close()
                continue
            if direction == 0:
                self._pending[token] = conn
                continue
            first = self._pending.pop(token, None)
            if first is None:
                conn.close()
                continue
            first.settimeout(None)
            conn.settimeout(None)
            # the dialer's first connection carries its frames to us: our rx
            t = self.transport
            return ShmConnection(conn, first, t.slots, t.slot_bytes, t.limits, dialer=False)

    def close(self) -> None:
        for s in self._pending.values():
            s.close()
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class ShmTransport(Transport):
    """``slot_bytes`` bounds one frame's payload; ``slots`` frames can be in flight."""

    name = "shm"

    def __init__(self, slot_bytes: int = 64 << 20, slots: int = 2, limits: Limits | None = None) -> None:
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.limits = limits

    def connect(self, address: Any, timeout: float | None = 30.0) -> ShmConnection:
        token = os.urandom(16)
        socks = []
        try:
            for direction in (0, 1):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(s)
                s.settimeout(timeout)
                s.connect(str(address))
                s.sendall(_OPEN.pack(b"VRMO", direction, token))
        except OSError as e:
            for s in socks:
                s.close()
            raise LinkError(f"cannot connect to shm endpoint {address}: {e}") from None
        for s in socks:
            s.settimeout(None)
        return ShmConnection(socks[0], socks[1], self.slots, self.slot_bytes, self.limits, dialer=True)

    def listen(self, address: Any) -> ShmListener:
        path = str(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
        except OSError as e:
            sock.close()
            raise LinkError(f"cannot listen on {path}: {e}") from None
        sock.listen(8)
        return ShmListener(sock, path, self)
