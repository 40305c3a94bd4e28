"""VRAMancer Link: tensors stage to stage over TCP, TLS (the Secure Fabric), shared memory or
torch.distributed, in validated binary frames (docs/link-protocol.md). Importing this package
imports neither torch nor cryptography; the transports load on demand (transport.TRANSPORTS)."""
from __future__ import annotations

from .errors import FrameError, LinkError, PeerRefusedError, PlaintextRefusedError

__all__ = ["LinkError", "FrameError", "PeerRefusedError", "PlaintextRefusedError"]
