"""The steady-state paths of StreamConnection: a frame whose header (but its stream and sequence) and
descriptors equal, byte for byte, those of a frame validated before is accepted without parsing, and
a single numpy array of the previous frame's dtype and shape is sent with only its stream and
sequence packed. These tests check that the fast paths are taken, put the same bytes on the wire as
the general path, and refuse what the general path refuses: a changed layout goes back to the full
checks, a replayed sequence, an oversized length, a new stream past the limit, bad destinations."""
from __future__ import annotations

import random
import socket
import struct
import time

import numpy as np
import pytest

from vramancer.link.errors import FrameError, LinkError
from vramancer.link.frame import DESC_FIXED_BYTES, HEADER_BYTES, FrameType, FrameWriter, Limits, TensorDesc
from vramancer.link.transport import StreamConnection

from .conftest import in_thread, pair

pytestmark = pytest.mark.usefixtures("link_hot_path")   # every test on the C and the Python path

DESC = TensorDesc(2, (8192,), 8192)                      # uint8 [8192]
FRAME_BYTES = HEADER_BYTES + DESC_FIXED_BYTES + 8 + 8192
PAYLOAD = bytes(range(256)) * 32


def _raw(w: FrameWriter, descs, payload: bytes, stream_id: int = 0, patch: dict | None = None) -> bytes:
    head = bytearray(w.header(FrameType.TENSORS, descs, stream_id))
    for offset, (fmt, value) in (patch or {}).items():
        struct.pack_into(fmt, head, offset, value)
    return bytes(head) + payload


class _NoParsing:
    """Makes the reader's parsing entry points fail the test: frames must take the fast path."""

    def __init__(self, conn: StreamConnection, monkeypatch) -> None:
        def boom(*_a, **_k):
            raise AssertionError("the general receive path ran")
        monkeypatch.setattr(conn.reader, "parse_header", boom)
        monkeypatch.setattr(conn.reader, "known_frame", boom)


def _primed(monkeypatch=None, limits: Limits | None = None):
    """A pair whose receiver accepted two frames of DESC on stream 0 (the layout is now known)."""
    a, b = pair(limits)
    w = FrameWriter()
    a.sock.sendall(_raw(w, [DESC], PAYLOAD) + _raw(w, [DESC], PAYLOAD))
    dest = np.empty(8192, dtype=np.uint8)
    assert [b.recv(into=[dest]).seq for _ in range(2)] == [1, 2] and dest.tobytes() == PAYLOAD
    return a, b, w, dest


def test_steady_state_frames_skip_parsing_and_count_exact_bytes(monkeypatch):
    a, b, w, dest = _primed()
    _NoParsing(b, monkeypatch)
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, 8192, dtype=np.uint8) for _ in range(20)]
    a.sock.sendall(b"".join(_raw(w, [DESC], x.tobytes()) for x in frames))
    for i, x in enumerate(frames):
        f = b.recv(into=[dest])
        assert (f.frame_type, f.stream_id, f.seq) == (FrameType.TENSORS, 0, 3 + i)
        assert f.tensors[0] is dest and np.array_equal(dest, x) and f.descs == [DESC]
    assert b.bytes_received == 22 * FRAME_BYTES


def test_steady_state_with_a_factory_and_other_dtypes(monkeypatch):
    """Fast headers, destinations from a factory or of a multi-dimensional dtype (cast to bytes)."""
    a, b = pair()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for i in range(2):
        a.send([x + i])
        assert np.array_equal(b.recv().tensors[0], x + i)
    _NoParsing(b, monkeypatch)
    dest = np.empty((3, 4), dtype=np.float32)
    for i in range(2, 6):
        a.send([x + i])
        f = b.recv(into=[dest]) if i % 2 else b.recv()
        assert np.array_equal(f.tensors[0], x + i) and f.seq == i + 1
    assert a.bytes_sent == b.bytes_received == 6 * (HEADER_BYTES + DESC_FIXED_BYTES + 16 + 48)


def test_a_changed_layout_after_fast_frames_takes_the_full_checks():
    a, b, w, dest = _primed()
    other = TensorDesc(2, (4096,), 4096)
    a.sock.sendall(_raw(w, [other], PAYLOAD[:4096]) + _raw(w, [DESC], PAYLOAD))
    f = b.recv()                                          # a valid new layout: accepted, allocated by numpy
    assert f.tensors[0].shape == (4096,) and f.tensors[0].tobytes() == PAYLOAD[:4096] and f.seq == 3
    assert b.recv(into=[dest]).seq == 4                   # and the first layout again
    bad = TensorDesc(2, (4096,), 8192)                    # byte length != numel x itemsize
    a.sock.sendall(_raw(w, [bad], PAYLOAD))
    with pytest.raises(FrameError, match="byte length 8192 != 4096 x 1"):
        b.recv(into=[dest])
    assert b.closed


@pytest.mark.parametrize("patch,reason", [
    ({12: ("<Q", 3)}, "sequence 3 not after 3"),                            # replayed
    ({12: ("<Q", 1)}, "sequence 1 not after 3"),                            # reordered
    ({28: ("<Q", 1 << 40)}, "over the limit"),                              # oversized payload length
    ({24: ("<I", 1 << 31)}, "descriptor bytes 2147483648 impossible"),       # oversized descriptor block
    ({4: ("<B", 2)}, "unsupported version 2"),
    ({5: ("<B", 2)}, "CLOSE frame carries tensors"),
    ({22: ("<H", 1)}, "reserved header field is 1"),
    ({HEADER_BYTES + 4: ("<Q", 1 << 40)}, "byte length 1099511627776 != 8192 x 1"),  # oversized tensor
    ({HEADER_BYTES + DESC_FIXED_BYTES: ("<Q", 1 << 40)}, r"byte length 8192 != 1099511627776 x 1"),
])
def test_refusals_after_fast_frames(patch, reason):
    a, b, w, dest = _primed()
    keep = dest.copy()
    a.sock.sendall(_raw(w, [DESC], PAYLOAD, patch={12: ("<Q", 3)}))   # a third frame, on the fast path
    assert b.recv(into=[dest]).seq == 3
    a.sock.sendall(_raw(w, [DESC], b"\xff" * 8192, patch=patch))
    with pytest.raises(FrameError, match=reason):
        b.recv(into=[dest])
    assert b.closed and np.array_equal(dest, keep)        # the refused frame's payload was not written


def test_a_new_stream_with_a_known_layout_counts_against_the_stream_limit():
    a, b, w, dest = _primed(limits=Limits(max_streams=1))
    a.sock.sendall(_raw(w, [DESC], PAYLOAD, stream_id=1))
    with pytest.raises(FrameError, match="more than 1 streams"):
        b.recv(into=[dest])


@pytest.mark.parametrize("make,reason", [
    (lambda: np.empty(8192, dtype=np.int8), "destination is int8"),
    (lambda: np.empty((2, 4096), dtype=np.uint8), r"destination is uint8 \[2, 4096\]"),
    (lambda: np.empty(16384, dtype=np.uint8)[::2], "destination is uint8"),            # not contiguous
    (lambda: np.empty(8192, dtype=np.uint8).view(np.dtype(np.uint8).newbyteorder()), None),
])
def test_destinations_checked_on_the_fast_path(make, reason):
    a, b, w, dest = _primed()
    a.sock.sendall(_raw(w, [DESC], PAYLOAD))
    d = make()
    if reason is None:                                    # an equal dtype object that is not numpy's own
        assert b.recv(into=[d]).tensors[0].tobytes() == PAYLOAD
        return
    with pytest.raises(FrameError, match=reason):
        b.recv(into=[d])
    assert b.closed


def test_a_read_only_destination_is_refused_on_the_fast_path():
    a, b, w, dest = _primed()
    a.sock.sendall(_raw(w, [DESC], PAYLOAD))
    ro = np.empty(8192, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(FrameError, match="destination is uint8"):
        b.recv(into=[ro])


def test_fast_frames_arriving_in_odd_pieces():
    """One layout, frames written in random pieces: the fast path sees partial headers and payloads."""
    rng = np.random.default_rng(11)
    frames = [rng.integers(0, 256, 8192, dtype=np.uint8) for _ in range(30)]
    w = FrameWriter()
    blob = b"".join(_raw(w, [DESC], x.tobytes()) for x in frames)
    s_a, s_b = socket.socketpair()
    conn = StreamConnection(s_b)

    def write():
        pos, r = 0, random.Random(5)
        while pos < len(blob):
            n = r.choice([1, 3, 20, 36, 56, 100, 4000, 8248, 9000])
            s_a.sendall(blob[pos:pos + n])
            pos += n
            if r.random() < 0.1:
                time.sleep(0.001)

    writer = in_thread(write)
    dest = np.empty(8192, dtype=np.uint8)
    for i, x in enumerate(frames):
        f = conn.recv(into=[dest])
        assert f.seq == i + 1 and np.array_equal(dest, x), i
    writer.result()
    assert conn.bytes_received == len(blob)
    s_a.close()
    with pytest.raises(LinkError, match="peer closed the connection$"):
        conn.recv(into=[dest])


def test_send_fast_path_writes_what_the_general_path_writes():
    """Frames sent on the fast path (same dtype and shape as the previous one) are byte-identical to
    FrameWriter's; a new stream starts at 1, a non-contiguous array or another dtype leaves it."""
    s_a, s_b = socket.socketpair()
    conn = StreamConnection(s_a)
    x = np.arange(8, dtype=np.float32)
    sent = [(x * 1, 0), (x * 2, 0), (x * 3, 5), (x * 4, 0), (np.arange(16, dtype=np.float32)[::2], 0),
            (x.astype(np.int32), 0), (x * 5, 5)]
    for arr, stream in sent:
        assert conn.send([arr], stream_id=stream) == HEADER_BYTES + DESC_FIXED_BYTES + 8 + 32
    w = FrameWriter()
    expect = b"".join(
        _raw(w, [TensorDesc(5 if arr.dtype == np.int32 else 8, (8,), 32)], np.ascontiguousarray(arr).tobytes(), stream)
        for arr, stream in sent)
    got = b""
    while len(got) < len(expect):
        got += s_b.recv(1 << 16)
    assert got == expect and conn.bytes_sent == len(expect)
    with pytest.raises(FrameError, match="stream id 4294967296 is not a u32"):
        conn.send([x], stream_id=1 << 32)
    conn.close()
    with pytest.raises(LinkError, match="connection is closed"):
        conn.send([x])


def test_alternating_layouts_each_checked_and_delivered():
    """Two layouts in turn (the last-layout check misses every time; the validated-block cache hits)."""
    a, b = pair()
    x = np.arange(8, dtype=np.float32)
    y = np.arange(6, dtype=np.int64).reshape(2, 3)
    dx, dy = np.empty_like(x), np.empty_like(y)
    for i in range(6):
        a.send([x + i])
        a.send([y * i], stream_id=1)
        assert b.recv(into=[dx]).seq == i + 1 and np.array_equal(dx, x + i)
        f = b.recv(into=[dy])
        assert (f.stream_id, f.seq) == (1, i + 1) and np.array_equal(dy, y * i)
    a.send([y])                                           # on stream 0, into a float32 destination
    with pytest.raises(FrameError, match=r"destination is float32 \[8\], frame has int64 \[2, 3\]"):
        b.recv(into=[dx])
    assert a.bytes_sent == b.bytes_received + 48


def test_fast_sends_and_control_frames_share_one_sequence():
    a, b = pair()
    x = np.zeros(4, dtype=np.float64)
    for _ in range(3):
        a.send([x])
    a.send_control(FrameType.CLOSE)
    assert [b.recv().seq for _ in range(3)] == [1, 2, 3]
    close = b.recv()
    assert (close.frame_type, close.seq) == (FrameType.CLOSE, 4) and b.closed
