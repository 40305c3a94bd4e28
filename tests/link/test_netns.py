"""Two network namespaces joined by a veth pair (10.231.x addresses only inside them): TLS works
across truly separate addresses, plaintext TCP is refused there unless trusted_network=True.
Skipped with the reason when not root or `ip` is missing; the namespaces are deleted in a finally."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces():
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is missing")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    pid = os.getpid() % 100000
    a, b = f"vrmlink{pid}a", f"vrmlink{pid}b"
    made = []
    try:
        for ns in (a, b):
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as e:
                pytest.skip(f"cannot create a network namespace: {e.stderr.decode().strip()}")
            made.append(ns)
        _ip("link", "add", f"vl{pid}a", "netns", a, "type", "veth", "peer", "name", f"vl{pid}b", "netns", b)
        for ns, dev, addr in ((a, f"vl{pid}a", "10.231.7.1/24"), (b, f"vl{pid}b", "10.231.7.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_tls_across_namespaces_and_plaintext_only_when_trusted(namespaces, nodes):
    a, b = namespaces
    server_id, client_id = nodes.identity("server"), nodes.identity("client")
    nodes.trust("server", "client").save()
    nodes.trust("client", "server").save()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    peer = [sys.executable, "-m", "tests.link._netns_peer"]
    server = subprocess.Popen(["ip", "netns", "exec", a, *peer, "server", "10.231.7.1", str(nodes.root / "server"),
                               str(nodes.root / "server-trust.json")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        client = subprocess.run(["ip", "netns", "exec", b, *peer, "client", "10.231.7.1", str(nodes.root / "client"),
                                 str(nodes.root / "client-trust.json")], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        assert client.returncode == 0, client.stderr
        seen = json.loads(client.stdout.strip().splitlines()[-1])
        assert server.wait(TIMEOUT_S) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert seen["tls"] == 2 * sum(range(1000)) and seen["tcp_trusted"] == 2 * sum(range(1000))
    assert seen["tls_peer"] == server_id.fingerprint and seen["tls_version"] == "TLSv1.3"
    assert seen["plaintext"].startswith("refusing plaintext TCP to 10.231.7.1: not a loopback address")
    assert client_id.fingerprint != server_id.fingerprint
