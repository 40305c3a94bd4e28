"""Plaintext TCP is never chosen silently; the transport registry; a malformed frame closes only
its connection (the listener and other connections carry on)."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from vramancer.link.errors import FrameError, PlaintextRefusedError
from vramancer.link.tcp import TcpTransport, is_loopback
from vramancer.link.transport import TRANSPORTS, Transport, make_transport, transport_class

from .conftest import in_thread

pytestmark = pytest.mark.usefixtures("link_hot_path")   # every test on the C and the Python path


def test_plaintext_to_a_non_loopback_address_is_refused_in_one_line():
    with pytest.raises(PlaintextRefusedError) as e:
        TcpTransport().connect(("10.255.255.1", 5000))           # refused before any packet is sent
    assert "\n" not in str(e.value) and "trusted_network=True" in str(e.value) and e.value.exit_code == 2
    with pytest.raises(PlaintextRefusedError):
        TcpTransport().listen(("0.0.0.0", 0))
    with pytest.raises(PlaintextRefusedError):
        make_transport("tcp").connect(("10.0.0.7", 1))


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("10.1.2.3") and not is_loopback("192.168.0.1")


def test_the_registry_names_every_transport():
    assert set(TRANSPORTS) == {"tcp", "tls", "shm", "torch"}
    for name in TRANSPORTS:
        cls = transport_class(name)
        assert issubclass(cls, Transport) and cls.name == name


def test_tcp_round_trip_and_a_malformed_frame_closes_only_that_connection(caplog):
    t = TcpTransport()
    listener = t.listen(("127.0.0.1", 0))
    accepted = in_thread(listener.accept, 20)
    good = t.connect(listener.address)
    server_side = accepted.result()
    x = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert good.send([x]) == 36 + 12 + 16 + 24
    assert np.array_equal(server_side.recv().tensors[0], x)

    accepted = in_thread(listener.accept, 20)
    raw = socket.create_connection(listener.address)
    bad_side = accepted.result()
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 40)
    with pytest.raises(FrameError, match="bad magic"):
        bad_side.recv()
    assert bad_side.closed and "closing connection: bad magic" in caplog.text
    raw.close()

    good.send([x * 2])                                           # the other connection is untouched
    assert np.array_equal(server_side.recv().tensors[0], x * 2)
    good.close(), server_side.close(), listener.close()
