"""torch.distributed transport: Link frames over ``dist.send`` / ``dist.recv``.

The process group must be initialized by the caller (``torch.distributed.init_process_group``):
gloo on the CPU, NCCL between GPUs where present (then headers and payloads travel as CUDA
tensors and GPUDirect is used where NCCL finds it). A frame is the fixed 36-byte header, then the
descriptor block (its size comes from the validated header), then each tensor's bytes as a uint8
view of the tensor, received straight into the destination (a torch tensor of the announced dtype
and shape). The same validation as every transport runs before a destination is allocated.
A frame whose descriptors and payload together hold at most ``PACKED_BYTES`` travels as two messages:
the header, then descriptors and payloads in one buffer (both sides decide from the validated header;
each message costs a rendezvous, so a small frame of several tensors no longer pays one per tensor); the
receiver validates the descriptors from that buffer, then copies each payload into its destination.
Only the gloo path is tested here; the NCCL path is the same code with ``device="cuda"``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import FrameError, LinkError
from .frame import HEADER_BYTES, BufferFactory, FrameType, Limits, TensorDesc, as_payload
from .transport import Connection, Frame, Listener, Transport

__all__ = ["TorchDistTransport", "DistConnection", "PACKED_BYTES"]

PACKED_BYTES = 256 * 1024   # descriptors + payload up to this: one message after the header


def _bytes_of(t: Any) -> Any:
    import torch

    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


class DistConnection(Connection):
    name = "torch"

    def __init__(self, peer_rank: int, limits: Limits | None = None, group: Any = None,
                 device: str | None = None) -> None:
        super().__init__(limits)
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            raise LinkError("torch.distributed is not initialized: call init_process_group first")
        self.dist = dist
        self.peer = peer_rank
        self.group = group
        backend = dist.get_backend(group)
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self._head = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.device)

    def _send_t(self, t: Any) -> None:
        self.dist.send(t, self.peer, group=self.group)

    def _recv_t(self, t: Any) -> None:
        self.dist.recv(t, self.peer, group=self.group)

    def send(self, tensors: Sequence[Any], stream_id: int = 0) -> int:
        import torch

        if self.closed:
            raise LinkError("link torch: connection is closed")
        outs, descs = [], []
        for obj in tensors:
            if isinstance(obj, torch.Tensor) and obj.device.type == self.device.type:
                from .frame import DTYPE_BY_NAME

                t = obj.detach().contiguous()
                dtype = DTYPE_BY_NAME.get(str(t.dtype).removeprefix("torch."))
                if dtype is None:
                    raise FrameError(f"dtype {t.dtype} cannot travel over the Link")
                descs.append(TensorDesc(dtype.code, tuple(t.shape), t.numel() * dtype.itemsize))
                outs.append(_bytes_of(t))
            else:
                desc, mv, _keep = as_payload(obj)
                descs.append(desc)
                outs.append(torch.frombuffer(mv, dtype=torch.uint8).to(self.device) if mv.nbytes
                            else torch.empty(0, dtype=torch.uint8, device=self.device))
        blob = self.writer.header(FrameType.TENSORS, descs, stream_id)
        meta = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)
        payload = sum(d.byte_length for d in descs)
        try:
            self._send_t(meta[:HEADER_BYTES])
            if len(blob) - HEADER_BYTES + payload <= PACKED_BYTES:
                if len(blob) > HEADER_BYTES or payload:
                    self._send_t(torch.cat([meta[HEADER_BYTES:], *outs]))
            else:
                if len(blob) > HEADER_BYTES:
                    self._send_t(meta[HEADER_BYTES:])
                for t in outs:
                    if t.numel():
                        self._send_t(t)
        except RuntimeError as e:
            self.close()
            raise LinkError(f"link torch: send failed: {e}") from None
        self.bytes_sent += len(blob) + payload
        return len(blob) + payload

    def send_control(self, frame_type: FrameType, stream_id: int = 0) -> None:
        """A frame without tensors (CLOSE, REKEY): its header alone."""
        import torch

        if self.closed:
            raise LinkError("link torch: connection is closed")
        head = self.writer.header(frame_type, [], stream_id)
        try:
            self._send_t(torch.frombuffer(bytearray(head), dtype=torch.uint8).to(self.device))
        except RuntimeError as e:
            self.close()
            raise LinkError(f"link torch: send failed: {e}") from None
        self.bytes_sent += len(head)

    def recv(self, into: Sequence[Any] | None = None, factory: BufferFactory | None = None) -> Frame:
        import torch

        if self.closed:
            raise LinkError("link torch: connection is closed")
        packed = None
        try:
            self._recv_t(self._head)
            head = self.reader.parse_header(self._head.cpu().numpy().tobytes())
            if head.desc_bytes + head.payload_bytes <= PACKED_BYTES:   # one message (bounded by the limit)
                packed = torch.empty(head.desc_bytes + head.payload_bytes, dtype=torch.uint8, device=self.device)
                if packed.numel():
                    self._recv_t(packed)
                desc_t = packed[:head.desc_bytes]
            else:
                desc_t = torch.empty(head.desc_bytes, dtype=torch.uint8, device=self.device)
                if head.desc_bytes:
                    self._recv_t(desc_t)
            descs = self.reader.parse_descriptors(head, desc_t.cpu().numpy().tobytes())
        except FrameError as e:
            raise self._refuse(str(e)) from None
        except RuntimeError as e:
            self.close()
            raise LinkError(f"link torch: receive failed: {e}") from None
        self.bytes_received += HEADER_BYTES + head.desc_bytes    # as the sender counts: header + descriptors
        if head.frame_type != FrameType.TENSORS:
            self.reader.accept(head)
            if head.frame_type == FrameType.CLOSE:
                self.close()
            return Frame(head.frame_type, head.stream_id, head.seq)
        objs = []
        for i, d in enumerate(descs):
            if into is not None:
                if len(into) != len(descs):
                    raise self._refuse(f"frame has {len(descs)} tensors, {len(into)} destinations given")
                t = into[i]
                if not isinstance(t, torch.Tensor) or str(t.dtype).removeprefix("torch.") != d.dtype.name \
                        or tuple(t.shape) != d.shape or not t.is_contiguous():
                    raise self._refuse(f"destination {i} does not match {d.dtype.name} {list(d.shape)}")
            elif factory is not None:
                t, _ = factory(d)
            else:
                t = torch.empty(d.shape, dtype=getattr(torch, d.dtype.name), device=self.device)
            objs.append(t)
        try:
            at = head.desc_bytes
            for t, d in zip(objs, descs):
                if not d.byte_length:
                    continue
                if packed is not None:
                    _bytes_of(t).copy_(packed[at:at + d.byte_length])
                    at += d.byte_length
                else:
                    self._recv_t(_bytes_of(t))
        except RuntimeError as e:
            self.close()
            raise LinkError(f"link torch: receive failed: {e}") from None
        self.reader.accept(head)
        self.bytes_received += head.payload_bytes
        return Frame(head.frame_type, head.stream_id, head.seq, descs, objs)

    def close(self) -> None:
        self.closed = True


class _DistListener(Listener):
    def __init__(self, transport: TorchDistTransport, peer_rank: int) -> None:
        self.transport = transport
        self.peer_rank = peer_rank

    def accept(self, timeout: float | None = None) -> DistConnection:
        return self.transport.connect(self.peer_rank)

    def close(self) -> None:
        pass


class TorchDistTransport(Transport):
    """``address`` is the peer's rank in ``group`` (default: the world)."""

    name = "torch"

    def __init__(self, group: Any = None, limits: Limits | None = None, device: str | None = None) -> None:
        self.group = group
        self.limits = limits
        self.device = device

    def connect(self, address: Any, timeout: float | None = 30.0) -> DistConnection:
        return DistConnection(int(address), self.limits, self.group, self.device)

    def listen(self, address: Any) -> Listener:
        return _DistListener(self, int(address))
