"""Mutual TLS 1.3 pinned to fingerprints: trusted peers connect; unknown, revoked and tampered
peers are refused with their fingerprint in the log; a flipped bit kills the connection; a replayed
frame is refused; sessions resume; long sessions rekey with a fresh handshake."""
from __future__ import annotations

import logging
import socket
import ssl
import threading

import numpy as np
import pytest

from vramancer.link.errors import FrameError, LinkError, PeerRefusedError
from vramancer.link.frame import FrameType, FrameWriter, TensorDesc
from vramancer.link.keys import Identity

from .conftest import in_thread

pytest.importorskip("cryptography")
from vramancer.link.tls import TlsTransport  # noqa: E402


def _pair(nodes, server="b", client="a", server_trust=None, client_trust=None, **client_opts):
    srv = TlsTransport(nodes.identity(server), server_trust or nodes.trust(server, client))
    cli = TlsTransport(nodes.identity(client), client_trust or nodes.trust(client, server), **client_opts)
    return srv, cli, srv.listen(("127.0.0.1", 0))


def test_trusted_peers_exchange_frames_over_tls_1_3(nodes):
    srv, cli, listener = _pair(nodes)
    accepted = in_thread(listener.accept, 20)
    conn = cli.connect(listener.address)
    peer = accepted.result()
    assert conn.sock.version() == "TLSv1.3" and peer.sock.version() == "TLSv1.3"
    assert conn.peer_fingerprint == nodes.identity("b").fingerprint
    assert peer.peer_fingerprint == nodes.identity("a").fingerprint
    x = np.arange(3000, dtype=np.float64)
    conn.send([x, np.float32(2.5)])
    got = peer.recv()
    assert np.array_equal(got.tensors[0], x) and got.tensors[1] == np.float32(2.5)
    peer.send([x[:10]])
    assert np.array_equal(conn.recv().tensors[0], x[:10])
    conn.close(), peer.close(), listener.close()


@pytest.mark.parametrize("verdict", ["unknown", "revoked"])
def test_server_refuses_an_unknown_or_revoked_client_with_its_fingerprint(nodes, verdict, caplog):
    store = nodes.trust("b", "c") if verdict == "unknown" else nodes.trust("b", revoked=("a",))
    srv, cli, listener = _pair(nodes, server_trust=store)
    accepted = in_thread(listener.accept, 20)
    with caplog.at_level(logging.WARNING, logger="vramancer.link"):
        with pytest.raises(LinkError):
            cli.connect(listener.address)
        with pytest.raises(PeerRefusedError) as refused:
            accepted.result()
    fp = nodes.identity("a").fingerprint
    assert refused.value.fingerprint == fp
    assert f"refused {verdict} peer {fp}" in caplog.text
    listener.close()


def test_client_refuses_an_unknown_server(nodes, caplog):
    srv, cli, listener = _pair(nodes, client_trust=nodes.trust("a", "c"))
    accepted = in_thread(lambda: pytest.raises(LinkError, listener.accept, 20))
    with pytest.raises(PeerRefusedError) as refused:
        cli.connect(listener.address)
    assert refused.value.fingerprint == nodes.identity("b").fingerprint
    assert f"refused unknown peer {nodes.identity('b').fingerprint}" in caplog.text
    accepted.result()
    listener.close()


def test_a_peer_announcing_a_trusted_certificate_without_its_key_is_refused(nodes):
    a, c = nodes.identity("a"), nodes.identity("c")
    forged = Identity(c.key_path, c.cert_path, a.cert_der, a.fingerprint)   # says "a", holds c's key
    srv = TlsTransport(nodes.identity("b"), nodes.trust("b", "a"))
    cli = TlsTransport(forged, nodes.trust("a", "b"))
    listener = srv.listen(("127.0.0.1", 0))
    accepted = in_thread(lambda: pytest.raises(LinkError, listener.accept, 20))
    with pytest.raises(LinkError):
        cli.connect(listener.address)
    accepted.result()
    listener.close()


class _FlipProxy:
    """A TCP relay on 127.0.0.1 that flips one bit of the client->server stream at byte ``at``."""

    def __init__(self, target, at: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.target, self.at = target, at
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pump(self, src, dst, flip_at):
        seen = 0
        try:
            while chunk := src.recv(65536):
                if flip_at is not None and seen <= flip_at < seen + len(chunk):
                    buf = bytearray(chunk)
                    buf[flip_at - seen] ^= 0x10
                    chunk = bytes(buf)
                seen += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self):
        client, _ = self.sock.accept()
        server = socket.create_connection(self.target)
        back = threading.Thread(target=self._pump, args=(server, client, None), daemon=True)
        back.start()
        self._pump(client, server, self.at)
        back.join(10)


def test_a_flipped_bit_in_the_tls_stream_kills_the_connection(nodes, caplog):
    srv, cli, listener = _pair(nodes)
    proxy = _FlipProxy(listener.address, at=40_000)            # far past the handshake, inside the payload
    accepted = in_thread(listener.accept, 20)
    conn = cli.connect(proxy.address)
    peer = accepted.result()
    x = np.ones(64 * 1024, dtype=np.uint8)

    def send_all() -> None:   # ends by itself, or by LinkError once the receiver hung up: both are fine
        try:
            for _ in range(50):
                conn.send([x])
        except LinkError:
            pass

    sender = in_thread(send_all)
    received = 0
    with pytest.raises(LinkError, match="receive failed.*(BAD_RECORD_MAC|DECRYPTION_FAILED)"):
        for _ in range(50):          # the flipped record is refused before the 50 frames all arrive
            peer.recv()
            received += 1
    assert received < 50 and peer.closed
    conn.close()
    sender.result()
    listener.close()


def test_a_replayed_frame_is_refused_over_tls(nodes, caplog):
    srv, cli, listener = _pair(nodes)
    accepted = in_thread(listener.accept, 20)
    conn = cli.connect(listener.address)
    peer = accepted.result()
    frame = FrameWriter().header(FrameType.TENSORS, [TensorDesc(2, (1,), 1)]) + b"\x05"
    conn.sock.sendall(frame + frame)
    assert peer.recv().tensors[0].tolist() == [5]
    with pytest.raises(FrameError, match="replayed"):
        peer.recv()
    assert peer.closed and "replayed" in caplog.text
    conn.close(), listener.close()


def test_sessions_resume_and_long_sessions_rekey(nodes):
    srv, cli, listener = _pair(nodes, rekey_after_bytes=8_000)  # a rekey before frames 3 and 5
    x = np.arange(1000, dtype=np.float32)                       # 4 KB a frame
    received = []

    def serve():
        for _ in range(2):
            peer = listener.accept(20)
            for _ in range(6):
                received.append(peer.recv().tensors[0])
            received.append(peer.rekeys)
            peer.close()

    server = in_thread(serve)
    first = cli.connect(listener.address)
    assert not first.session_reused
    for _ in range(6):
        first.send([x])
    assert first.rekeys == 2 and first.session_reused           # each rekey: a resumed, fresh handshake
    first.close()
    second = cli.connect(listener.address)
    assert second.session_reused
    for _ in range(6):
        second.send([x])
    second.close()
    server.result()
    assert received[6] == 2 and received[13] == 2
    assert all(np.array_equal(r, x) for i, r in enumerate(received) if i not in (6, 13))
    listener.close()


def test_only_tls_1_3_is_spoken(nodes):
    srv, cli, listener = _pair(nodes)
    ctx = srv._context(True, "x", nodes.identity("a").cert_der)
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    listener.close()


def test_a_session_older_than_rekey_after_seconds_rekeys_at_the_next_send(nodes):
    import time

    srv, cli, listener = _pair(nodes, rekey_after_seconds=0.3)
    accepted = in_thread(listener.accept, 20)
    conn = cli.connect(listener.address)
    peer = accepted.result()
    got = in_thread(lambda: [peer.recv().tensors[0].tolist() for _ in range(3)])
    conn.send([np.array([1], dtype=np.int32)])
    conn.send([np.array([2], dtype=np.int32)])                  # well within 0.3 s: same keys
    assert conn.rekeys == 0
    time.sleep(0.35)
    conn.send([np.array([3], dtype=np.int32)])                  # older than 0.3 s: a fresh handshake first
    assert got.result() == [[1], [2], [3]]
    assert conn.rekeys == 1 and peer.rekeys == 1 and conn.session_reused
    assert peer.reader.last_seq[0] == 4        # one sequence across the swap (the REKEY frame was 3)
    conn.close(), peer.close(), listener.close()
