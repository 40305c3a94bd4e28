"""Frames round-trip every dtype torch and numpy share, 0-d / empty / many / 16 MiB tensors, with
exact byte counts; replayed and reordered frames are refused; destinations are checked."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from vramancer.link.errors import FrameError, LinkError
from vramancer.link.frame import (
    DESC_FIXED_BYTES,
    DTYPES,
    HEADER_BYTES,
    FrameType,
    FrameWriter,
    Limits,
    TensorDesc,
    numpy_buffers,
    torch_buffers,
)

from .conftest import Counting, in_thread, pair

pytestmark = pytest.mark.usefixtures("link_hot_path")   # every test on the C and the Python path

torch = pytest.importorskip("torch")

NUMPY_DTYPES = [d.name for d in DTYPES.values() if d.numpy is not None]
TORCH_DTYPES = [d.name for d in DTYPES.values()]


def _frame_bytes(*arrays) -> int:
    return HEADER_BYTES + sum(DESC_FIXED_BYTES + 8 * a.ndim + a.nbytes if isinstance(a, (np.ndarray, np.generic))
                              else DESC_FIXED_BYTES + 8 * a.dim() + a.numel() * a.element_size() for a in arrays)


def _sample_np(name: str, shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if name.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(name)
    if name.startswith("float"):
        return rng.standard_normal(shape).astype(name)
    info = np.iinfo(name)
    return rng.integers(info.min, info.max, size=shape, dtype=name, endpoint=True)


@pytest.mark.parametrize("name", NUMPY_DTYPES)
def test_numpy_round_trip_every_dtype(name):
    a, b = pair()
    x = _sample_np(name, (3, 5))
    scalar = _sample_np(name, ())
    empty = np.empty((0, 7), dtype=name)
    n = a.send([x, scalar, empty], stream_id=9)
    assert n == _frame_bytes(x, scalar, empty)
    frame = b.recv()
    assert (frame.frame_type, frame.stream_id, frame.seq) == (FrameType.TENSORS, 9, 1)
    got_x, got_s, got_e = frame.tensors
    assert got_x.dtype == x.dtype and got_x.shape == (3, 5) and got_x.tobytes() == x.tobytes()
    assert got_s.shape == () and got_s.tobytes() == scalar.tobytes()
    assert got_e.shape == (0, 7) and got_e.dtype == x.dtype
    assert b.bytes_received == n


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_torch_round_trip_every_dtype(name):
    a, b = pair()
    dtype = getattr(torch, name)
    src = torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4)
    x = (src % 2).to(dtype) if name == "bool" else (src.abs() if name.startswith("uint") else src).to(dtype)
    zero_d = x.reshape(-1)[5].clone()
    a.send([x, zero_d, x[:0]])
    frame = b.recv(factory=torch_buffers)
    got, got0, gote = frame.tensors
    assert got.dtype == dtype and torch.equal(got, x)
    assert got0.dim() == 0 and torch.equal(got0, zero_d)
    assert gote.shape == (0, 4)


def test_torch_tensors_into_torch_destinations_frame_after_frame():
    """Torch tensors go out from their own bytes and land in caller tensors (every dtype, 0-d, a
    tensor that requires grad), frame after frame on one layout; a wrong destination is refused."""
    a, b = pair()
    srcs = [torch.arange(12, dtype=torch.int64).reshape(3, 4).to(getattr(torch, n)) for n in TORCH_DTYPES]
    srcs += [torch.tensor(2.5), torch.ones(3, requires_grad=True)]
    dests = [torch.empty_like(t).detach() for t in srcs]
    for i in range(3):
        sent = [t * (i + 1) if t.dtype != torch.bool else t for t in srcs[:-1]] + [srcs[-1]]
        assert a.send(sent) == _frame_bytes(*sent)
        frame = b.recv(into=dests)
        assert frame.seq == i + 1 and all(g is d for g, d in zip(frame.tensors, dests))
        assert all(torch.equal(d, t.detach()) for d, t in zip(dests, sent))
    a.send(srcs[:1])
    with pytest.raises(FrameError, match="destination is int32"):
        b.recv(into=[torch.empty(3, 4, dtype=torch.int32)])


def test_non_contiguous_and_many_tensors_in_one_frame():
    a, b = pair()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = [base.t(), base[:, ::2], *[torch.full((i,), float(i)) for i in range(40)]]
    a.send(tensors)
    frame = b.recv(factory=torch_buffers)
    assert len(frame.tensors) == 42
    for want, got in zip(tensors, frame.tensors):
        assert torch.equal(want, got)


def test_16_mib_frame_into_caller_buffers():
    a, b = pair()
    x = np.random.default_rng(1).standard_normal(4 << 20).astype(np.float32)   # 16 MiB
    sender = in_thread(a.send, [x])
    dest = np.empty_like(x)
    counting = Counting(numpy_buffers)
    frame = b.recv(into=[dest], factory=counting)
    assert sender.result() == HEADER_BYTES + DESC_FIXED_BYTES + 8 + (16 << 20)
    assert frame.tensors[0] is dest and np.array_equal(dest, x)
    assert counting.calls == 0                                   # nothing allocated: it went into dest


def test_raw_bytearray_destination_and_mismatch():
    a, b = pair()
    a.send([np.arange(4, dtype=np.int32)])
    raw = bytearray(16)
    b.recv(into=[raw])
    assert np.frombuffer(raw, dtype=np.int32).tolist() == [0, 1, 2, 3]
    a.send([np.arange(4, dtype=np.int32)])
    with pytest.raises(FrameError, match="destination"):
        b.recv(into=[np.empty(4, dtype=np.int64)])
    assert b.closed


def test_numpy_factory_refuses_bfloat16_in_one_line():
    a, b = pair()
    a.send([torch.ones(2, dtype=torch.bfloat16)])
    with pytest.raises(FrameError, match="torch_buffers"):
        b.recv()


def test_replayed_frame_is_refused_and_logged(caplog):
    a, b = pair()
    frame = FrameWriter().header(FrameType.TENSORS, [])
    a.sock.sendall(frame + frame)                     # the same frame twice: sequence 1 again
    assert b.recv().seq == 1
    with caplog.at_level(logging.WARNING, logger="vramancer.link"):
        with pytest.raises(FrameError, match="replayed"):
            b.recv()
    assert "sequence 1 not after 1" in caplog.text
    assert b.closed
    with pytest.raises(LinkError):
        b.recv()


def test_reordered_frames_are_refused_but_streams_are_independent():
    a, b = pair()
    w = FrameWriter()
    f1, f2 = w.header(FrameType.TENSORS, []), w.header(FrameType.TENSORS, [])
    other = w.header(FrameType.TENSORS, [], stream_id=5)
    a.sock.sendall(f2 + other + f1)
    assert b.recv().seq == 2
    assert (b.recv().stream_id, b.reader.last_seq[5]) == (5, 1)
    with pytest.raises(FrameError, match="sequence 1 not after 2"):
        b.recv()


def test_close_frame_closes_and_limits_are_enforced_on_send_side_sizes():
    a, b = pair(Limits(max_frame_bytes=HEADER_BYTES + DESC_FIXED_BYTES + 8 + 100))
    a.send([np.zeros(100, dtype=np.uint8)])             # exactly at the limit
    assert b.recv().tensors[0].nbytes == 100
    a.send([np.zeros(101, dtype=np.uint8)])
    with pytest.raises(FrameError, match="over the limit"):
        b.recv()
    c, d = pair()
    c.send_control(FrameType.CLOSE)
    assert d.recv().frame_type == FrameType.CLOSE and d.closed


def test_unsendable_objects_are_refused():
    a, _ = pair()
    with pytest.raises(FrameError, match="numpy arrays and torch tensors"):
        a.send([[1, 2, 3]])
    with pytest.raises(FrameError, match="cannot travel"):
        a.send([np.array(["x"])])


def _raw(w: FrameWriter, descs, payload: bytes, stream_id: int = 0, patch: dict | None = None) -> bytes:
    """A frame as bytes; ``patch``: header fields (struct offsets) to overwrite after packing."""
    import struct

    head = bytearray(w.header(FrameType.TENSORS, descs, stream_id))
    for offset, (fmt, value) in (patch or {}).items():
        struct.pack_into(fmt, head, offset, value)
    return bytes(head) + payload


@pytest.mark.parametrize("field,offset,fmt,value,reason", [
    ("payload bytes", 28, "<Q", 8193, "tensors hold 8192 bytes, header says 8193"),
    ("tensor count", 20, "<H", 2, "descriptor bytes 20 impossible for 2 tensors"),
    ("flags", 6, "<H", 1, "unknown flags"),
    ("sequence", 12, "<Q", 2, "sequence 2 not after 2"),
    ("frame size", 28, "<Q", 1 << 40, "over the limit"),
])
def test_a_known_layout_is_checked_as_fully_as_a_new_one(field, offset, fmt, value, reason, caplog):
    """The receive fast path (a stream and descriptor block seen before) refuses exactly what the
    general path refuses: the frames below differ from two accepted ones in one header field."""
    a, b = pair()
    w = FrameWriter()
    desc = TensorDesc(2, (8192,), 8192)
    payload = bytes(range(256)) * 32
    a.sock.sendall(_raw(w, [desc], payload) + _raw(w, [desc], payload))
    dest = np.empty(8192, dtype=np.uint8)
    assert b.recv(into=[dest]).seq == 1 and b.recv(into=[dest]).seq == 2 and dest.tobytes() == payload
    a.sock.sendall(_raw(w, [desc], payload, patch={offset: (fmt, value)}))
    with caplog.at_level(logging.WARNING, logger="vramancer.link"):
        with pytest.raises(FrameError, match=reason):
            b.recv(into=[dest])
    assert b.closed and "closing connection" in caplog.text


def test_repeated_layouts_reuse_the_encoded_header_but_not_its_numbers():
    """Frames of one layout: each has its own sequence number and stream, exact byte counts, and
    a caller's destination of the wrong dtype or shape is refused on the fast path too."""
    a, b = pair()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    sizes = [a.send([x * i], stream_id=i % 2) for i in range(6)]
    assert sizes == [HEADER_BYTES + DESC_FIXED_BYTES + 16 + 24] * 6
    got = [b.recv() for _ in range(6)]
    assert [(f.stream_id, f.seq) for f in got] == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
    assert all(np.array_equal(f.tensors[0], x * i) for i, f in enumerate(got))
    a.send([x, np.zeros(3, dtype=np.int64)])                       # a second layout, then the first again
    a.send([x])
    two = b.recv()
    assert [t.dtype for t in two.tensors] == [np.float32, np.int64]
    with pytest.raises(FrameError, match="destination is float64"):
        b.recv(into=[np.empty((2, 3), dtype=np.float64)])
    assert a.bytes_sent == b.bytes_received + 24                   # the refused frame's payload was not read


def test_frames_arriving_in_odd_pieces_are_reassembled_exactly():
    """Frames of mixed sizes (a few bytes to past the staging buffer), written in random pieces
    with pauses, so headers, descriptors and payloads straddle reads and the staging buffer's end."""
    import random
    import socket
    import time

    from vramancer.link.transport import StreamConnection

    rng = np.random.default_rng(7)
    sizes = [0, 1, 35, 36, 37, 4000, 8192, 40_000, 70_000, 200_000, 3, 65_536, 65_500, 12]
    arrays = [rng.integers(0, 255, size=n, dtype=np.uint8) for n in sizes]
    arrays += [rng.standard_normal((k, 7)).astype(np.float32) for k in (1, 300, 3000)]
    w = FrameWriter()
    blob = b""
    for i, x in enumerate(arrays):
        blob += w.header(FrameType.TENSORS, [TensorDesc(2 if x.dtype == np.uint8 else 8, x.shape, x.nbytes)],
                         stream_id=i % 3) + x.tobytes()
    a, b = socket.socketpair()
    conn = StreamConnection(b)

    def write():
        pos, r = 0, random.Random(1)
        while pos < len(blob):
            n = r.choice([1, 2, 7, 36, 50, 1000, 30_000, 100_000])
            a.sendall(blob[pos:pos + n])
            pos += n
            if r.random() < 0.2:
                time.sleep(0.001)

    writer = in_thread(write)
    for i, x in enumerate(arrays):
        dest = np.empty_like(x) if i % 2 else None
        frame = conn.recv(into=[dest]) if dest is not None else conn.recv()
        assert frame.stream_id == i % 3 and frame.tensors[0].tobytes() == x.tobytes(), i
    writer.result()
    assert conn.bytes_received == len(blob)
    a.close()
    with pytest.raises(LinkError, match="peer closed the connection$"):
        conn.recv()
