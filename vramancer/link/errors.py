"""The Link's errors: every failure of a frame, a transport or a peer is a ``LinkError``.

    LinkError (VramancerError, exit 1)
    ├── FrameError        a frame that is malformed, over a limit, replayed or out of order
    ├── PeerRefusedError  a TLS peer whose key is unknown, revoked, or does not match what it announced
    └── PlaintextRefusedError (also BadInputError, exit 2)
                          plaintext TCP / shm to a non-loopback address without ``trusted_network=True``

A connection that raises one of these is closed by whoever raised it; the process carries on.
"""
from __future__ import annotations

from ..errors import BadInputError, VramancerError

__all__ = ["LinkError", "FrameError", "PeerRefusedError", "PlaintextRefusedError"]


class LinkError(VramancerError):
    """Any failure of the VRAMancer Link (a closed or broken connection included)."""


class FrameError(LinkError):
    """A frame refused before any of its payload was allocated; ``reason`` is one line."""


class PeerRefusedError(LinkError):
    """A peer refused by the Secure Fabric; ``fingerprint`` is its key's fingerprint (hex groups)."""

    def __init__(self, message: str, fingerprint: str = "") -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class PlaintextRefusedError(LinkError, BadInputError):
    exit_code = 2
