"""Plaintext TCP transport. Loopback only unless ``trusted_network=True`` (``--trusted-network``):
plaintext is never chosen silently for a real network; use the TLS transport there."""
from __future__ import annotations

import ipaddress
import socket
from typing import Any

from .errors import LinkError, PlaintextRefusedError
from .frame import Limits
from .transport import Connection, Listener, StreamConnection, Transport

__all__ = ["TcpTransport", "TcpListener", "is_loopback", "check_plaintext", "tune_socket", "recv_exact"]

_BUF_BYTES = 4 << 20


def recv_exact(sock: socket.socket, n: int, closed: str) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (handshakes and control messages, not frames);
    LinkError(``closed``) when the peer closes first."""
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(mv[got:])
        if k == 0:
            raise LinkError(closed)
        got += k
    return bytes(buf)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_plaintext(host: str, trusted_network: bool, what: str = "plaintext TCP") -> None:
    if not trusted_network and not is_loopback(host):
        raise PlaintextRefusedError(
            f"refusing {what} to {host}: not a loopback address; use the tls transport, "
            f"or pass trusted_network=True (--trusted-network) on a network you trust")


def tune_socket(sock: socket.socket, buffers: bool = True) -> None:
    """TCP_NODELAY, and with ``buffers`` 4 MiB socket buffers (plaintext: fewer wake-ups per large
    frame). TLS leaves the buffers to the kernel: a large send buffer cost ~10% more CPU per
    encrypted byte (records leave the cache before the kernel copies them)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not buffers:
        return
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _BUF_BYTES)
        except OSError:
            pass


def dial(address: tuple[str, int], timeout: float | None, buffers: bool = True) -> socket.socket:
    host, port = address
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise LinkError(f"cannot connect to {host}:{port}: {e}") from None
    sock.settimeout(None)
    tune_socket(sock, buffers)
    return sock


def bind(address: tuple[str, int]) -> socket.socket:
    """A listening socket for Link connections (not inherited by processes this one starts)."""
    from .._net import bind_socket

    host, port = address
    return bind_socket(host, port, backlog=16, inheritable=False, error=LinkError)


class TcpListener(Listener):
    def __init__(self, sock: socket.socket, limits: Limits | None) -> None:
        self.sock = sock
        self.limits = limits

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def accept(self, timeout: float | None = None) -> Connection:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            raise LinkError(f"accept failed: {e}") from None
        conn.settimeout(None)
        tune_socket(conn)
        return StreamConnection(conn, self.limits, "tcp")

    def close(self) -> None:
        self.sock.close()


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, trusted_network: bool = False, limits: Limits | None = None) -> None:
        self.trusted_network = trusted_network
        self.limits = limits

    def connect(self, address: Any, timeout: float | None = 30.0) -> Connection:
        check_plaintext(address[0], self.trusted_network)
        return StreamConnection(dial(address, timeout), self.limits, "tcp")

    def listen(self, address: Any) -> TcpListener:
        host = address[0]
        if host in ("", "0.0.0.0", "::"):
            if not self.trusted_network:
                raise PlaintextRefusedError(f"refusing to serve plaintext TCP on every interface ({host!r}) "
                                            "without trusted_network=True (--trusted-network)")
        else:
            check_plaintext(host, self.trusted_network, "to serve plaintext TCP")
        return TcpListener(bind(address), self.limits)
