"""TLS transport of the Secure Fabric: mutual TLS 1.3 pinned to trusted key fingerprints, no CA.

Connection set-up, on a fresh TCP connection:

1. Hello, both ways, before TLS (dialer first): magic b"VRMH" | version u8 | kind u8 (0 new,
   1 rekey) | token 16 bytes | certificate length u32 (<= 16 KiB) | the DER certificate. Certificates
   are public; the hello only says which key the peer claims. Its fingerprint is checked against
   the trust store at once: unknown or revoked is refused (logged with the fingerprint), before TLS.
2. TLS 1.3 only (min = max = TLSv1_3), both sides present their certificate, and each side's
   SSLContext trusts exactly the one certificate the peer announced (``cadata``): the handshake's
   CertificateVerify proves the peer holds that key, the Finished MACs cover the whole handshake.
3. Right after the handshake, before any frame: the certificate TLS verified must have the
   announced, trusted, non-revoked fingerprint, or the connection is closed (tampered peer).

Session resumption: the dialer keeps each server's ``ssl.SSLSession`` (TLS 1.3 ticket) and offers
it on the next connection to that server and fingerprint (same SSLContext, cached per peer);
``TlsConnection.session_reused`` says whether it was used. Resumption still runs an (EC)DHE
exchange (psk_dhe_ke), so its traffic keys are fresh.

Rekeying: Python's ssl module exposes no TLS 1.3 KeyUpdate. Instead the dialing side, at a frame
boundary before sending, once ``rekey_after_bytes`` (sent + received) or ``rekey_after_seconds``
have passed since the last handshake, sends a REKEY frame, closes the TLS connection, dials again
(hello kind 1 with the connection's token, same fingerprint required) and carries on over the new
connection: new handshake, new keys; sequence numbers continue, so nothing can be replayed across.
The listening side swaps sockets when it reads the REKEY frame. Only the dialer starts a rekey: a
dialer that only ever receives is rekeyed when it next sends.
"""
from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from typing import Any

from .errors import LinkError, PeerRefusedError
from .frame import BufferFactory, FrameType, Limits
from .keys import Identity, TrustStore, fingerprint_of_cert, load_identity
from .tcp import bind, dial, recv_exact, tune_socket
from .transport import Frame, Listener, StreamConnection, Transport, log

__all__ = ["TlsTransport", "TlsListener", "TlsConnection", "HELLO", "MAX_CERT_BYTES"]

HELLO = struct.Struct("<4sBB16sI")
HELLO_MAGIC = b"VRMH"
MAX_CERT_BYTES = 16 * 1024
_NEW, _REKEY = 0, 1
_READY = b"\x01"
_HANDSHAKE_TIMEOUT_S = 30.0


def _recv_hello(sock: socket.socket, n: int) -> bytes:
    return recv_exact(sock, n, "peer closed the connection during the hello (refused, or not a VRAMancer Link)")


def _send_hello(sock: socket.socket, identity: Identity, kind: int, token: bytes) -> None:
    sock.sendall(HELLO.pack(HELLO_MAGIC, 1, kind, token, len(identity.cert_der)) + identity.cert_der)


def _read_hello(sock: socket.socket) -> tuple[int, bytes, bytes]:
    magic, version, kind, token, cert_len = HELLO.unpack(_recv_hello(sock, HELLO.size))
    if magic != HELLO_MAGIC or version != 1 or kind not in (_NEW, _REKEY):
        raise LinkError(f"bad hello (magic {magic!r}, version {version}, kind {kind})")
    if cert_len > MAX_CERT_BYTES:
        raise LinkError(f"hello certificate of {cert_len} bytes, limit {MAX_CERT_BYTES}")
    return kind, token, _recv_hello(sock, cert_len)


class TlsConnection(StreamConnection):
    def __init__(self, sock: ssl.SSLSocket, peer_fingerprint: str, token: bytes, limits: Limits | None,
                 transport: TlsTransport, listener: TlsListener | None = None,
                 address: tuple[str, int] | None = None) -> None:
        super().__init__(sock, limits, "tls")
        self.peer_fingerprint = peer_fingerprint
        self.token = token
        self.transport = transport
        self.listener = listener
        self.address = address
        self.rekeys = 0
        self._mark()

    @property
    def session_reused(self) -> bool:
        return bool(self.sock.session_reused)

    def _mark(self) -> None:
        self._since_bytes = self.bytes_sent + self.bytes_received
        self._since_time = time.monotonic()

    def _rekey_due(self) -> bool:
        t = self.transport
        return (self.bytes_sent + self.bytes_received - self._since_bytes >= t.rekey_after_bytes
                or time.monotonic() - self._since_time >= t.rekey_after_seconds)

    def send(self, tensors: Sequence[Any], stream_id: int = 0) -> int:
        if self.address is not None and not self.closed and self._rekey_due():
            self.rekey()
        return super().send(tensors, stream_id)

    def rekey(self) -> None:
        """Dialer only: REKEY frame, close, fresh handshake on a new connection, same token."""
        if self.address is None:
            raise LinkError("only the dialing side starts a rekey")
        self.send_control(FrameType.REKEY)
        self.transport._remember(self)
        old = self.sock
        self.sock = self.transport._dial_tls(self.address, _REKEY, self.token, expect=self.peer_fingerprint)[0]
        try:
            old.close()
        except OSError:
            pass
        self.rekeys += 1
        self._mark()

    def recv(self, into: Sequence[Any] | None = None, factory: BufferFactory | None = None) -> Frame:
        while True:
            frame = super().recv(into, factory)
            if frame.frame_type != FrameType.REKEY:
                if self.address is not None:
                    self.transport._remember(self)
                return frame
            if self.listener is None:
                raise self._refuse("REKEY frame from the listening side")
            old = self.sock
            try:
                self.sock = self.listener._take_rekey(self.token, self.peer_fingerprint)
            except LinkError as e:
                raise self._refuse(f"rekey failed: {e}", LinkError) from None
            old.close()
            self.rekeys += 1
            self._mark()

    def close(self) -> None:
        if not self.closed and self.address is not None:
            self.transport._remember(self)
        super().close()


class TlsListener(Listener):
    def __init__(self, sock: socket.socket, transport: TlsTransport) -> None:
        self.sock = sock
        self.transport = transport
        self._rekeys: dict[bytes, tuple[ssl.SSLSocket, str]] = {}
        self._fresh: list[TlsConnection] = []

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def _accept_one(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)
        try:
            raw, peer = self.sock.accept()
        except OSError as e:
            raise LinkError(f"accept failed: {e}") from None
        tune_socket(raw, buffers=False)
        kind, token, ssock, fp = self.transport._serve_tls(raw, f"{peer[0]}:{peer[1]}")
        if kind == _REKEY:
            self._rekeys[token] = (ssock, fp)
        else:
            self._fresh.append(TlsConnection(ssock, fp, token, self.transport.limits, self.transport, listener=self))

    def accept(self, timeout: float | None = None) -> TlsConnection:
        """The next new connection; an untrusted or tampered peer raises PeerRefusedError."""
        while not self._fresh:
            self._accept_one(timeout)
        return self._fresh.pop(0)

    def _take_rekey(self, token: bytes, fingerprint: str) -> ssl.SSLSocket:
        deadline = time.monotonic() + _HANDSHAKE_TIMEOUT_S
        while token not in self._rekeys:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkError("the peer did not reconnect after REKEY")
            self._accept_one(left)
        ssock, fp = self._rekeys.pop(token)
        if fp != fingerprint:
            ssock.close()
            raise PeerRefusedError(f"rekey connection from another key {fp}", fp)
        return ssock

    def close(self) -> None:
        for conn in self._fresh:
            conn.close()
        for ssock, _ in self._rekeys.values():
            ssock.close()
        self.sock.close()


class TlsTransport(Transport):
    """Mutual TLS 1.3 pinned to ``trust``'s fingerprints; ``identity`` is this node's key."""

    name = "tls"

    def __init__(self, identity: Identity | None = None, trust: TrustStore | None = None,
                 limits: Limits | None = None, rekey_after_bytes: int = 64 << 30,
                 rekey_after_seconds: float = 3600.0) -> None:
        self.identity = identity or load_identity()
        self.trust = trust or TrustStore.load()
        self.limits = limits
        self.rekey_after_bytes = rekey_after_bytes
        self.rekey_after_seconds = rekey_after_seconds
        self._contexts: dict[tuple[bool, str], ssl.SSLContext] = {}
        self._sessions: dict[tuple[str, int, str], ssl.SSLSession] = {}
        self.last_session_reused = False

    # -- trust -----------------------------------------------------------------------------------
    def _check(self, cert_der: bytes, where: str) -> str:
        fp = fingerprint_of_cert(cert_der)
        verdict = self.trust.verdict(fp)
        if verdict != "trusted":
            log.warning("link tls: refused %s peer %s at %s", verdict, fp, where)
            raise PeerRefusedError(f"refused {verdict} peer {fp} at {where}", fp)
        return fp

    def _context(self, server_side: bool, peer_fp: str, peer_cert_der: bytes) -> ssl.SSLContext:
        key = (server_side, peer_fp)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.maximum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_cert_chain(self.identity.cert_path, self.identity.key_path)
            ctx.load_verify_locations(cadata=peer_cert_der)
            self._contexts[key] = ctx
        return ctx

    def _verify_after(self, ssock: ssl.SSLSocket, announced_fp: str, where: str) -> None:
        der = ssock.getpeercert(binary_form=True)
        fp = fingerprint_of_cert(der) if der else "(none)"
        if fp != announced_fp or self.trust.verdict(fp) != "trusted":
            log.warning("link tls: refused tampered peer %s (announced %s) at %s", fp, announced_fp, where)
            ssock.close()
            raise PeerRefusedError(f"refused tampered peer {fp} at {where}", fp)

    # -- dialing ---------------------------------------------------------------------------------
    def _dial_tls(self, address: tuple[str, int], kind: int, token: bytes, expect: str | None = None,
                  timeout: float | None = _HANDSHAKE_TIMEOUT_S) -> tuple[ssl.SSLSocket, str, bytes]:
        raw = dial(address, timeout, buffers=False)
        where = f"{address[0]}:{address[1]}"
        try:
            raw.settimeout(_HANDSHAKE_TIMEOUT_S)
            _send_hello(raw, self.identity, kind, token)
            _, server_token, cert = _read_hello(raw)
            fp = self._check(cert, where)
            if expect is not None and fp != expect:
                raise PeerRefusedError(f"refused peer {fp} at {where}: expected {expect}", fp)
            ctx = self._context(False, fp, cert)
            session = self._sessions.get((address[0], address[1], fp))
            ssock = ctx.wrap_socket(raw, server_side=False, session=session)
            self.last_session_reused = ssock.session_reused
            self._verify_after(ssock, fp, where)
            # the server's go-ahead, inside TLS: it accepted us, and its session tickets are read
            if _recv_hello(ssock, 1) != _READY:
                raise LinkError(f"{where} did not confirm the connection")
            ssock.settimeout(None)
        except (OSError, ssl.SSLError) as e:
            raw.close()
            raise LinkError(f"TLS handshake with {where} failed: {e}") from None
        except LinkError:
            raw.close()
            raise
        return ssock, fp, server_token if kind == _NEW else token

    def connect(self, address: Any, timeout: float | None = 30.0) -> TlsConnection:
        address = (address[0], int(address[1]))
        ssock, fp, token = self._dial_tls(address, _NEW, bytes(16), timeout=timeout)
        return TlsConnection(ssock, fp, token, self.limits, self, address=address)

    def _remember(self, conn: TlsConnection) -> None:
        try:
            session = conn.sock.session
        except (OSError, ValueError, AttributeError):
            return
        if session is not None and conn.address is not None:
            self._sessions[(conn.address[0], conn.address[1], conn.peer_fingerprint)] = session

    # -- serving ---------------------------------------------------------------------------------
    def _serve_tls(self, raw: socket.socket, where: str) -> tuple[int, bytes, ssl.SSLSocket, str]:
        try:
            raw.settimeout(_HANDSHAKE_TIMEOUT_S)
            kind, token, cert = _read_hello(raw)
            fp = self._check(cert, where)
            if kind == _NEW:
                token = os.urandom(16)
            _send_hello(raw, self.identity, kind, token)
            ssock = self._context(True, fp, cert).wrap_socket(raw, server_side=True)
            self._verify_after(ssock, fp, where)
            ssock.sendall(_READY)
            ssock.settimeout(None)
        except (OSError, ssl.SSLError) as e:
            raw.close()
            log.warning("link tls: handshake with %s failed: %s", where, e)
            raise LinkError(f"TLS handshake with {where} failed: {e}") from None
        except LinkError:
            raw.close()
            raise
        return kind, token, ssock, fp

    def listen(self, address: Any) -> TlsListener:
        return TlsListener(bind((address[0], int(address[1]))), self)
