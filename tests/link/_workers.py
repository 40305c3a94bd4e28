"""Child-process bodies of the shm and gloo tests (spawned: importable, top-level functions)."""
from __future__ import annotations

import numpy as np

__all__ = ["shm_echo", "gloo_peer"]


def shm_echo(path: str, slot_bytes: int, frames: int) -> None:
    """Connect to the shm listener at ``path``, echo ``frames`` frames back, doubled."""
    from vramancer.link.frame import torch_buffers
    from vramancer.link.shm import ShmTransport

    with ShmTransport(slot_bytes=slot_bytes).connect(path, timeout=30) as conn:
        for _ in range(frames):
            frame = conn.recv(factory=torch_buffers)
            conn.send([t * 2 if t.dtype.is_floating_point else t for t in frame.tensors], stream_id=frame.stream_id)


def gloo_peer(rank: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from vramancer.link.dist import PACKED_BYTES, TorchDistTransport
    from vramancer.link.frame import FrameType

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        conn = TorchDistTransport().connect(1 - rank)
        if rank == 0:
            conn.send([torch.arange(10, dtype=torch.float32).reshape(2, 5), torch.tensor(True),
                       torch.ones(0, 3, dtype=torch.bfloat16), np.arange(6, dtype=np.int64)], stream_id=4)
            conn.send([torch.full((1 << 20,), 3, dtype=torch.int32)])
            for n in (PACKED_BYTES - 20, PACKED_BYTES - 19):   # one 1-D descriptor is 20 bytes: packed, not
                conn.send([torch.arange(n, dtype=torch.int64).to(torch.uint8)])
            back = conn.recv()
            conn.send_control(FrameType.CLOSE)
            queue.put(("rank0", back.seq, back.tensors[0].tolist(), conn.bytes_sent, conn.bytes_received))
        else:
            first = conn.recv()
            second = conn.recv(into=[torch.empty(1 << 20, dtype=torch.int32)])
            edges = [conn.recv().tensors[0] for _ in range(2)]
            queue.put(("rank1-edges", [(t.numel(), bool(torch.equal(t, torch.arange(t.numel()).to(torch.uint8))))
                                       for t in edges]))
            queue.put(("rank1", first.stream_id, first.seq, [t.dtype for t in first.tensors],
                       [tuple(t.shape) for t in first.tensors], first.tensors[0].sum().item(),
                       first.tensors[3].tolist(), second.seq, int(second.tensors[0].sum())))
            conn.send([torch.tensor([7, 8, 9])])
            close = conn.recv()
            queue.put(("rank1-end", close.frame_type.name, conn.closed, conn.bytes_sent, conn.bytes_received))
    finally:
        dist.destroy_process_group()
