"""Shared helpers of the Link tests: node identities in tmp dirs, socket-pair connections, a sender thread."""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vramancer.link.frame import Limits, TensorDesc
from vramancer.link.transport import StreamConnection

__all__ = ["Counting", "pair", "in_thread", "nodes", "link_hot_path"]


@dataclass
class Counting:
    """A buffer factory that counts what it allocates (numpy or torch underneath)."""

    inner: Callable
    calls: int = 0
    bytes_allocated: int = 0

    def __call__(self, desc: TensorDesc):
        self.calls += 1
        self.bytes_allocated += desc.byte_length
        return self.inner(desc)


def pair(limits: Limits | None = None) -> tuple[StreamConnection, StreamConnection]:
    a, b = socket.socketpair()
    return StreamConnection(a, limits, "tcp"), StreamConnection(b, limits, "tcp")


class in_thread:
    """Run ``fn`` in a thread; ``.result()`` joins (with a timeout) and re-raises its exception."""

    def __init__(self, fn: Callable, *args) -> None:
        self.value = None
        self.error: BaseException | None = None

        def body():
            try:
                self.value = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                self.error = e

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class Nodes:
    root: Path

    def identity(self, name: str):
        from vramancer.link.keys import create_identity, load_identity

        d = self.root / name
        return load_identity(d) if (d / "node.key").exists() else create_identity(d, name=name)

    def trust(self, name: str, *trusted: str, revoked: tuple[str, ...] = ()):
        from vramancer.link.keys import TrustStore

        return TrustStore(self.root / f"{name}-trust.json", [self.identity(t).fingerprint for t in trusted],
                          [self.identity(r).fingerprint for r in revoked])


@pytest.fixture
def nodes(tmp_path: Path) -> Nodes:
    pytest.importorskip("cryptography")
    return Nodes(tmp_path)


@pytest.fixture(scope="module", params=["C", "Python"])
def link_hot_path(request):
    """Runs a module's tests once with the compiled steady state (vramancer/link/_fastlink.c) and once
    with the Python one: connections made meanwhile take that path (C skipped where it is not built)."""
    from vramancer.link import transport

    built = transport.fast_path
    if request.param == "C" and built is None:
        pytest.skip("vramancer/link/_fastlink.c is not built here")
    transport.fast_path = built if request.param == "C" else None
    yield request.param
    transport.fast_path = built
