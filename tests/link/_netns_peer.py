"""One end of the network-namespace test, run inside a namespace by ``ip netns exec``.

    python -m tests.link._netns_peer server HOST KEYS_DIR TRUST_FILE
    python -m tests.link._netns_peer client HOST KEYS_DIR TRUST_FILE

The server serves TLS on HOST:47001 and trusted-network TCP on HOST:47002, echoes one frame on
each (doubled), then exits; the client prints one JSON line of what it saw.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from vramancer.link.errors import PlaintextRefusedError
from vramancer.link.keys import TrustStore, load_identity
from vramancer.link.tcp import TcpTransport
from vramancer.link.tls import TlsTransport

__all__ = ["main"]

TLS_PORT, TCP_PORT = 47001, 47002


def main(argv: list[str]) -> int:
    role, host, keys, trust = argv
    tls = TlsTransport(load_identity(Path(keys)), TrustStore.load(Path(trust)))
    if role == "server":
        tls_listener = tls.listen((host, TLS_PORT))
        tcp_listener = TcpTransport(trusted_network=True).listen((host, TCP_PORT))
        print("ready", flush=True)
        for listener in (tls_listener, tcp_listener):
            conn = listener.accept(timeout=60)
            frame = conn.recv()
            conn.send([frame.tensors[0] * 2])
            conn.recv()                                    # the client's CLOSE
            listener.close()
        return 0
    x = np.arange(1000, dtype=np.float32)
    out: dict[str, object] = {}
    with tls.connect((host, TLS_PORT), timeout=30) as conn:
        conn.send([x])
        out["tls"] = conn.recv().tensors[0].sum().item()
        out["tls_peer"] = conn.peer_fingerprint
        out["tls_version"] = conn.sock.version()
        conn.send_control(2)
    try:
        TcpTransport().connect((host, TCP_PORT), timeout=5)
        out["plaintext"] = "connected"
    except PlaintextRefusedError as e:
        out["plaintext"] = str(e)
    with TcpTransport(trusted_network=True).connect((host, TCP_PORT), timeout=30) as conn:
        conn.send([x])
        out["tcp_trusted"] = conn.recv().tensors[0].sum().item()
        conn.send_control(2)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
