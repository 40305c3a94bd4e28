"""Real processes: the shm transport between two processes of this host, gloo send/recv between
two processes on 127.0.0.1 (multiprocessing spawn, every wait bounded, only our children ended)."""
from __future__ import annotations

import multiprocessing as mp
import socket

import numpy as np
import pytest

from . import _workers

torch = pytest.importorskip("torch")
TIMEOUT_S = 120


def _finish(proc) -> None:
    proc.join(TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        pytest.fail("child process did not finish in time")
    assert proc.exitcode == 0


def test_shm_between_two_processes(tmp_path):
    from vramancer.link.frame import FrameError, torch_buffers
    from vramancer.link.shm import ShmTransport

    path = str(tmp_path / "link.sock")
    transport = ShmTransport(slot_bytes=8 << 20)
    listener = transport.listen(path)
    proc = mp.get_context("spawn").Process(target=_workers.shm_echo, args=(path, 8 << 20, 4))
    proc.start()
    try:
        conn = listener.accept(timeout=TIMEOUT_S)
        big = np.random.default_rng(0).standard_normal(2 << 20).astype(np.float32)     # 8 MiB: one full slot
        conn.send([big], stream_id=1)
        back = conn.recv(into=[np.empty_like(big)])
        assert back.stream_id == 1 and np.array_equal(back.tensors[0], big * 2)
        ints, scalar, empty = np.arange(5, dtype=np.int64), np.float64(1.5), np.zeros((0, 2), np.float16)
        conn.send([ints, scalar, empty], stream_id=2)
        back = conn.recv()
        assert back.tensors[0].tolist() == [0, 1, 2, 3, 4] and back.tensors[1] == 3.0
        assert back.tensors[2].shape == (0, 2) and back.tensors[2].dtype == np.float16
        conn.send([torch.ones(3, dtype=torch.bfloat16)])
        back = conn.recv(factory=torch_buffers)
        assert torch.equal(back.tensors[0], torch.full((3,), 2.0, dtype=torch.bfloat16))
        with pytest.raises(FrameError, match="over the shm slot"):
            conn.send([np.zeros((8 << 20) + 1, np.uint8)])
        conn.send([big[:100]])
        assert np.array_equal(conn.recv().tensors[0], big[:100] * 2)
        _finish(proc)
        conn.close()
    finally:
        if proc.is_alive():
            proc.kill()
        listener.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_send_recv_between_two_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_workers.gloo_peer, args=(rank, port, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = dict(item[:1] + (item[1:],) for item in (queue.get(timeout=TIMEOUT_S) for _ in range(4)))
        for p in procs:
            _finish(p)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    stream, seq, dtypes, shapes, total, ints, seq2, big_sum = results["rank1"]
    assert (stream, seq, seq2) == (4, 1, 1)                   # stream 4 frame 1, then stream 0 frame 1
    assert dtypes == [torch.float32, torch.bool, torch.bfloat16, torch.int64]
    assert shapes == [(2, 5), (), (0, 3), (6,)]
    assert total == 45 and ints == [0, 1, 2, 3, 4, 5] and big_sum == 3 << 20
    assert results["rank0"][:2] == (1, [7, 8, 9])
    sent0, received0 = results["rank0"][2:]
    kind, closed, sent1, received1 = results["rank1-end"]
    from vramancer.link.dist import PACKED_BYTES

    # frames at the packing limit and one byte over it (packed after the header, then one message each)
    assert results["rank1-edges"] == ([(PACKED_BYTES - 20, True), (PACKED_BYTES - 19, True)],)
    assert (kind, closed) == ("CLOSE", True)              # send_control's CLOSE ends the receiving side
    assert (sent0, received0) == (received1, sent1)       # header + descriptors + payload, counted alike
