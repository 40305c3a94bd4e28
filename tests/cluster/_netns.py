"""A network namespace of the cluster tests' own: Ray, the Link and the HTTP server live there.

Ray refuses a loopback head (its drivers rewrite 127.0.0.1 to the machine's address), so the
cluster needs a real, non-loopback address; the tests make one that exists only inside a namespace
they create: a veth pair, both ends inside, one with 10.231.N.1/24, ``lo`` up, and a default route through that
interface so that Ray's node-IP discovery (a UDP connect, no packet sent) picks that address. Every
process that talks to the cluster runs under ``ip netns exec NS``; nothing binds an address outside
it. ``netns()`` deletes the namespace on the way out, whatever happened, after ending any process
still inside (only the test's own processes can be there).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Netns", "netns", "skip_reason", "REPO"]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Netns:
    name: str
    address: str      # the namespace's own address (not loopback), what Ray and the Link bind

    def cmd(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def python(self, *argv: str) -> list[str]:
        return self.cmd(sys.executable, *argv)


def skip_reason() -> str | None:
    """Why the namespace cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def netns(tag: str, subnet: int | None = None) -> Iterator[Netns]:
    """A namespace ``vrm<tag><pid>`` with 10.231.SUBNET.1 on a veth end; deleted after.
    Raises RuntimeError with ``ip``'s message when it cannot be made."""
    if not tag.isalnum() or len(tag) > 6:    # interface names (the name + "a") hold 15 characters
        raise ValueError(f"namespace tag {tag!r}: 1 to 6 letters or digits")
    pid = os.getpid() % 100000
    name = f"vrm{tag}{pid}"
    sub = subnet if subnet is not None else 100 + (pid + sum(map(ord, tag))) % 150
    address = f"10.231.{sub}.1"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)   # a leftover of this pid
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"cannot create a network namespace: {e.stderr.decode().strip()}") from None
    try:
        try:
            _ip("-n", name, "link", "set", "lo", "up")
            # a veth pair with both ends inside (the dummy driver is not in every kernel)
            _ip("link", "add", f"{name}a", "netns", name, "type", "veth", "peer", "name", f"{name}b", "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", f"{name}a")
            _ip("-n", name, "link", "set", f"{name}a", "up")
            _ip("-n", name, "link", "set", f"{name}b", "up")
            _ip("-n", name, "route", "add", "default", "dev", f"{name}a")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"cannot set up the network namespace {name}: "
                               f"{e.stderr.decode().strip()}") from None
        yield Netns(name, address)
    finally:
        _end_processes_inside(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _end_processes_inside(name: str, timeout_s: float = 10.0) -> None:
    """Whatever still runs inside the namespace (a Ray process a timed-out run left behind): only
    processes this test started can be there. SIGTERM, then SIGKILL."""
    import psutil

    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
    procs = []
    for pid in out.stdout.split():
        try:
            procs.append(psutil.Process(int(pid)))
        except (ValueError, psutil.Error):
            continue
    from vramancer.cluster.control import end_processes

    end_processes(procs, timeout_s)
