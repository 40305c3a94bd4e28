"""A bad header allocates nothing; fuzzed headers and truncated streams never raise anything but
LinkError and never allocate past the limit (counted through the destination-buffer factory)."""
from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramancer.link.errors import FrameError, LinkError
from vramancer.link.frame import (
    DESC_FIXED,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    FrameType,
    FrameWriter,
    Limits,
    TensorDesc,
    numpy_buffers,
)
from vramancer.link.transport import StreamConnection

from .conftest import Counting

pytestmark = pytest.mark.usefixtures("link_hot_path")   # every test on the C and the Python path

LIMIT = 4096                      # small: any allocation past it would show in the count
LIMITS = Limits(max_frame_bytes=LIMIT, max_tensors=16, max_ndim=4, max_streams=8)


def _feed(data: bytes) -> tuple[StreamConnection, Counting]:
    """A receiving connection whose peer wrote ``data`` and hung up."""
    a, b = socket.socketpair()
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    a.close()
    return StreamConnection(b, LIMITS, "tcp"), Counting(numpy_buffers)


def _valid(shapes=((4, 8),), dtype_code=8, seq=1) -> bytes:
    w = FrameWriter()
    w._next[0] = seq
    descs = [TensorDesc(dtype_code, s, int(np.prod(s)) * 4) for s in shapes]
    return w.header(FrameType.TENSORS, descs) + b"\x01" * sum(d.byte_length for d in descs)


def _header(**over) -> bytes:
    f = dict(magic=MAGIC, version=1, type=1, flags=0, stream=0, seq=1, count=1, reserved=0,
             desc_bytes=DESC_FIXED.size + 8, payload=128)
    f.update(over)
    return HEADER.pack(*f.values())


def _desc(code=8, ndim=1, reserved=0, length=128, shape=(32,)) -> bytes:
    return DESC_FIXED.pack(code, ndim, reserved, length) + b"".join(struct.pack("<Q", d) for d in shape)


BAD = {
    "magic": _header(magic=b"XXXX") + _desc(),
    "version": _header(version=2) + _desc(),
    "type": _header(type=9) + _desc(),
    "flags": _header(flags=1) + _desc(),
    "reserved": _header(reserved=1) + _desc(),
    "too many tensors": _header(count=17, desc_bytes=17 * 20) + _desc() * 17,
    "over the limit": _header(payload=1 << 60) + _desc(length=1 << 60, shape=(1 << 58,)),
    "desc bytes": _header(desc_bytes=3) + b"abc",
    "dtype": _header() + _desc(code=99),
    "ndim": _header(desc_bytes=DESC_FIXED.size + 40) + _desc(ndim=5, shape=(1,) * 5),
    "byte length": _header() + _desc(length=127),
    "numel overflow": _header(desc_bytes=DESC_FIXED.size + 32)
    + _desc(ndim=4, length=128, shape=(1 << 62, 1 << 62, 0, 2)),   # 0 elements, not 128 bytes
    "payload sum": _header(payload=64) + _desc(),
    "empty, huge dims": _header(desc_bytes=DESC_FIXED.size + 16, payload=0)      # numpy cannot make it
    + _desc(ndim=2, length=0, shape=(1 << 61, 0)),
    "control with tensors": _header(type=2) + _desc(),
    "sequence 0": _header(seq=0) + _desc(),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_header_allocates_nothing_and_closes(case, caplog):
    conn, counting = _feed(BAD[case] + b"\x00" * 128)
    with pytest.raises(FrameError):
        conn.recv(factory=counting)
    assert counting.calls == 0 and counting.bytes_allocated == 0
    assert conn.closed
    assert "closing connection" in caplog.text


def test_a_good_frame_at_the_same_site_passes():
    conn, counting = _feed(_header() + _desc() + b"\x07" * 128)
    frame = conn.recv(factory=counting)
    assert counting.calls == 1 and counting.bytes_allocated == 128
    assert frame.tensors[0].shape == (32,)


def test_truncated_payload_is_a_link_error_after_one_bounded_allocation():
    data = _valid()
    conn, counting = _feed(data[:-5])
    with pytest.raises(LinkError, match="mid-frame"):
        conn.recv(factory=counting)
    assert counting.bytes_allocated == 128 and conn.closed


def _check(data: bytes) -> None:
    conn, counting = _feed(data)
    try:
        while True:
            conn.recv(factory=counting)
    except LinkError:
        pass
    assert counting.bytes_allocated <= LIMIT
    assert conn.closed


@settings(max_examples=300)
@given(st.binary(max_size=HEADER_BYTES + 200))
def test_random_bytes(data):
    _check(data)


@settings(max_examples=300)
@given(st.data())
def test_mutated_valid_frames(data):
    shapes = data.draw(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=0, max_size=4))
    frame = bytearray(_valid(tuple(shapes)) * 2)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    _check(bytes(frame[:cut]))


@settings(max_examples=200)
@given(count=st.integers(0, (1 << 16) - 1), desc_bytes=st.integers(0, (1 << 32) - 1),
       payload=st.integers(0, (1 << 64) - 1), seq=st.integers(0, (1 << 64) - 1),
       tail=st.binary(max_size=300))
def test_fuzzed_header_fields(count, desc_bytes, payload, seq, tail):
    _check(_header(count=count, desc_bytes=desc_bytes, payload=payload, seq=seq) + tail)


@settings(max_examples=300)
@given(st.data())
def test_mutated_frames_of_a_known_layout(data):
    """Frames 2 and 3 repeat frame 1's layout, so they reach the receive fast path (a known stream,
    a descriptor block validated before); mutations there are caught as on the general path."""
    shapes = data.draw(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=0, max_size=4))
    first = _valid(tuple(shapes), seq=1)
    rest = bytearray(_valid(tuple(shapes), seq=2) + _valid(tuple(shapes), seq=3))
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(rest) - 1))
        rest[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(rest)))
    _check(first + bytes(rest[:cut]))


def test_frames_of_a_known_layout_arrive_whole():
    shapes = ((4, 8), (2, 2))
    conn, counting = _feed(b"".join(_valid(shapes, seq=s) for s in (1, 2, 3)))
    assert [conn.recv(factory=counting).seq for _ in range(3)] == [1, 2, 3]
    assert counting.bytes_allocated == 3 * (128 + 16)
    with pytest.raises(LinkError, match="peer closed the connection$"):
        conn.recv(factory=counting)
