"""The compiled steady state of StreamConnection (vramancer/link/_fastlink.c) against the Python one:
it is taken where it should be, gives byte for byte what the Python path gives on any input that
follows a validated frame (fuzzed: refusals, their messages, destinations, byte counts), finishes frames
on sockets with a timeout (partial sends and reads handed to Python), and VRAMANCER_LINK_PYTHON=1
turns it off. Every other Link test runs on both paths through the ``link_hot_path`` fixture."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramancer.link import transport
from vramancer.link.errors import LinkError
from vramancer.link.frame import FrameType, FrameWriter, Limits, TensorDesc
from vramancer.link.transport import StreamConnection

from .conftest import in_thread, pair

BUILT = transport.fast_path
needs_c = pytest.mark.skipif(BUILT is None, reason="vramancer/link/_fastlink.c is not built here")
DESC = TensorDesc(2, (64,), 64)                          # uint8 [64]
LIMITS = Limits(max_frame_bytes=4096, max_tensors=4, max_ndim=4, max_streams=3)


def _frame(w: FrameWriter, payload: bytes, descs=(DESC,), stream_id: int = 0) -> bytes:
    return w.header(FrameType.TENSORS, list(descs), stream_id) + payload


class _on_path:
    """Connections made inside the block take the C path (c=True) or the Python one."""

    def __init__(self, c: bool) -> None:
        self.value = BUILT if c else None

    def __enter__(self):
        transport.fast_path = self.value

    def __exit__(self, *exc):
        transport.fast_path = BUILT


def _outcome(data: bytes, c: bool) -> list:
    """What a receiver makes of ``data`` after two valid frames of DESC (the layout is then known):
    each frame received into a fresh uint8[64] destination, until an error or the end."""
    w = FrameWriter()
    prime = _frame(w, bytes(range(64))) + _frame(w, bytes(64))
    a, b = socket.socketpair()
    a.sendall(prime + data)
    a.shutdown(socket.SHUT_WR)
    with _on_path(c):
        conn = StreamConnection(b, LIMITS, "tcp")
    assert (conn._fd >= 0) == c
    out: list = []
    try:
        for _ in range(6):
            dest = np.full(64, 7, dtype=np.uint8)
            try:
                f = conn.recv(into=[dest])
            except LinkError as e:
                out.append(("refused", type(e).__name__, str(e), dest.tobytes(), conn.closed))
                break
            out.append(("frame", int(f.frame_type), f.stream_id, f.seq, f.descs, f.tensors[0] is dest, dest.tobytes()))
            if f.frame_type != FrameType.TENSORS:
                break
        out.append(conn.bytes_received)
    finally:
        conn.close()
        a.close()
    return out


@needs_c
def test_steady_state_frames_take_the_compiled_path(monkeypatch):
    with _on_path(True):
        a, b = pair()
    w = np.arange(4096, dtype=np.float32)
    dest = np.empty(4096, dtype=np.float32)
    a.send([w])
    b.recv(into=[dest])                                   # the first frame: validated in Python

    def boom(*_a, **_k):
        raise AssertionError("the Python path ran")
    monkeypatch.setattr(StreamConnection, "_send_py", boom)
    monkeypatch.setattr(StreamConnection, "_recv_py", boom)
    for i in range(5):
        w[0] = i
        assert a.send([w], stream_id=0) == 36 + 20 + 16384
        f = b.recv(into=[dest])
        assert (f.frame_type, f.stream_id, f.seq) == (FrameType.TENSORS, 0, i + 2)
        assert f.descs == [TensorDesc(8, (4096,), 16384)]
        assert f.tensors[0] is dest and np.array_equal(dest, w)
    assert a.bytes_sent == b.bytes_received == 6 * (36 + 20 + 16384)


def _mutations():
    """A valid third frame (or two), then bytes changed, cut or added: headers and descriptors that
    differ from the known layout in one field, replayed sequences, new streams, truncations."""
    def build(args):
        stream, seq_skip, flips, cut, extra, other = args
        w = FrameWriter()
        for _ in range(2 + seq_skip):
            w.next_seq(0)
        if stream:
            w.next_seq(stream)
        data = bytearray(_frame(w, bytes(range(100, 164)), stream_id=stream))
        if other:
            data += _frame(w, bytes(16), descs=(TensorDesc(2, (16,), 16),))
        data += _frame(w, bytes(range(64)), stream_id=stream)
        for pos, value in flips:
            data[pos % len(data)] = value
        if cut:
            data = data[:max(0, len(data) - cut)]
        return bytes(data) + extra
    return st.tuples(st.integers(0, 3), st.integers(-2, 2), st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)),
                                                                       max_size=3),
                     st.integers(0, 150), st.binary(max_size=40), st.booleans()).map(build)


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_fuzzed_frames_after_a_known_layout_same_outcome_on_both_paths(data):
    assert _outcome(data, True) == _outcome(data, False)


@needs_c
@pytest.mark.parametrize("data,message", [
    (b"", "peer closed the connection"),                  # the peer closes between frames
    (b"VRML\x01\x02", "peer closed the connection mid-frame"),  # ... in a header
])
def test_ends_of_stream_same_outcome_on_both_paths(data, message):
    got = _outcome(data, True)
    assert got == _outcome(data, False) and got[-2][0] == "refused" and got[-2][2].endswith(message)


@pytest.mark.parametrize("c", [pytest.param(True, marks=needs_c), False])
def test_frames_finish_on_sockets_with_a_timeout(c):
    """Non-blocking descriptors (a socket timeout): a send the kernel takes in parts and a payload read
    in parts are finished by the Python side; every frame arrives whole."""
    with _on_path(c):
        a, b = pair()
    a.sock.settimeout(10)
    b.sock.settimeout(10)
    frames = [np.random.default_rng(i).integers(0, 255, 1 << 20, dtype=np.uint8) for i in range(4)]

    def receive():
        dest = np.empty(1 << 20, dtype=np.uint8)
        got = []
        for _ in frames:
            got.append(b.recv(into=[dest]).tensors[0].copy())
        return got
    t = in_thread(receive)
    for f in frames:
        assert a.send([f]) == 36 + 20 + (1 << 20)
    got = t.result()
    assert all(np.array_equal(x, y) for x, y in zip(got, frames))
    assert a.bytes_sent == b.bytes_received == 4 * (36 + 20 + (1 << 20))


@pytest.mark.parametrize("c", [pytest.param(True, marks=needs_c), False])
def test_peer_closing_mid_payload_of_a_known_layout(c):
    with _on_path(c):
        a, b = pair()
    big = np.arange(1 << 16, dtype=np.int32)
    dest = np.empty_like(big)
    t = in_thread(lambda: [b.recv(into=[dest]) for _ in range(2)])
    a.send([big])
    a.send([big])
    t.result()
    raw = bytearray(a._tx[2])                               # the sender's encoded header of this layout
    raw[12:20] = (3).to_bytes(8, "little")                  # the next sequence number
    a.sock.sendall(bytes(raw) + big.tobytes()[:1000])
    a.sock.close()
    with pytest.raises(LinkError, match="peer closed the connection mid-frame"):
        b.recv(into=[dest])
    assert b.closed and b._fd == -1


def test_the_environment_turns_the_compiled_path_off():
    code = ("from vramancer.link import transport; from vramancer.link.transport import StreamConnection; "
            "import socket; a, b = socket.socketpair(); c = StreamConnection(a); "
            "print(transport.hot_path_name(), c._fd, StreamConnection.send is StreamConnection._send_py)")
    env = dict(os.environ, VRAMANCER_LINK_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Python", "-1", "True"]
    env.pop("VRAMANCER_LINK_PYTHON")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    built = importlib.util.find_spec("vramancer.link._fastlink") is not None
    assert out.stdout.split()[0] == ("C" if built else "Python")


@pytest.mark.parametrize("c", [pytest.param(True, marks=needs_c), False])
@pytest.mark.parametrize("timeout", [None, 10.0])
def test_large_and_small_frames_over_tcp_arrive_whole_in_order(c, timeout):
    """Plain TCP, with and without a socket timeout: payloads read partly from the staging buffer and
    partly straight into the destination (what follows staged), then a small frame; every byte arrives."""
    from vramancer.link.tcp import TcpTransport

    with _on_path(c):
        listener = TcpTransport().listen(("127.0.0.1", 0))
        conn = TcpTransport().connect(listener.address)
        peer = listener.accept(timeout=10)
    assert (peer._fd >= 0) == c
    peer.sock.settimeout(timeout)
    sizes = [(3 << 20) + 12, 700_001, 300_000, 16]
    frames = [np.random.default_rng(n).integers(0, 255, n, dtype=np.uint8) for n in sizes for _ in range(2)]

    def send():
        for f in frames:
            conn.send([f])
    t = in_thread(send)
    for f in frames:
        dest = np.empty_like(f)
        assert np.array_equal(peer.recv(into=[dest]).tensors[0], f)
    t.result()
    assert peer.bytes_received == conn.bytes_sent == sum(36 + 20 + f.nbytes for f in frames)
    conn.close()
    peer.close()
    listener.close()


@pytest.mark.parametrize("c", [pytest.param(True, marks=needs_c), False])
def test_a_socket_closed_directly_is_never_written_through_its_old_number(c):
    """conn.sock.close() (not conn.close()) frees the descriptor number; a socket opened next may get
    it. The next send must fail as on a closed socket, not write into that other socket."""
    with _on_path(c):
        a, b = pair()
    arr = np.arange(64, dtype=np.uint8)
    a.send([arr])
    b.recv(into=[np.empty(64, dtype=np.uint8)])
    old = a.sock.fileno()
    a.sock.close()
    x, y = socket.socketpair()
    try:
        assert old in (x.fileno(), y.fileno())              # the number is taken again
        with pytest.raises(LinkError, match="send failed"):
            a.send([arr])
        for s in (x, y):
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        x.close()
        y.close()
        b.close()
