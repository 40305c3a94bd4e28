"""VRAMancer Link on loopback against anchors measured in the same run, on the same machine.

Every pair is two processes: this one sends and times, a child started as
``python benchmarks/link.py --peer ...`` receives (or echoes). Rows:

    Link TCP one-way (--big-bytes, 16 MiB)   vs a plain Python socket sendall / recv_into   goal >= 0.9x
                                             vs torch.distributed gloo send / recv          goal >= 1.0x
    round trip (--small-bytes, 8 KiB)        vs a plain Python socket (latency ratio)       goal <= 1.2x
                                             vs gloo send / recv                            goal <= 0.5x
    Link TLS one-way (mutual TLS 1.3)        vs plain Python ssl sendall / recv_into        goal >= 0.9x
                                                (same TLS 1.3 contexts, same certificates)
    Link shm one-way                         vs Link TCP                                    goal >= 2x

One-way figures are GB/s (higher is better, ratio = ours / anchor); round trips are
microseconds (lower is better, ratio = ours / anchor). Each figure is the median over --repeat
runs of --iters-big / --iters-small operations, after one discarded warm-up run. Every pair is
connected first, then the runs take turns (ours, anchor, anchor, ...; repeat, the order turned by
one each round), so that other processes' load falls on ours and the anchors alike. The last
column, cpu_us/op, is this (timing) process's CPU time per operation, ours vs the anchor (all its
threads: gloo works in its own): where the time goes when wall-clock figures are scheduling-bound,
as on a loaded machine. Loops are bounded; every child has a timeout. Receivers write into
preallocated buffers in every variant.
The line under the table says which steady state the Link ran: "C" (vramancer/link/_fastlink.c, built
at install) or "Python" (not built, or VRAMANCER_LINK_PYTHON=1, which the child processes inherit).
Run:  python benchmarks/link.py [--repeat 5] [--json FILE]
A benchmark, not a test: it exits 0 and prints a table with a pass column per goal.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

__all__ = ["Row", "main", "measure"]

CHILD_TIMEOUT_S = 120


@dataclass(frozen=True)
class Row:
    metric: str
    unit: str
    ours: float
    anchor_name: str
    anchor: float
    ratio: float
    goal: str
    passed: bool
    ours_cpu_us: float = 0.0       # CPU time of this (timing) process per operation, all its threads
    anchor_cpu_us: float = 0.0


# ---------------------------------------------------------------------------------------------- peers
def _recv_exact(sock, mv: memoryview) -> None:
    got = 0
    while got < mv.nbytes:
        n = sock.recv_into(mv[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _tls_contexts(keys: Path, server_side: bool):
    import ssl

    from vramancer.link.keys import load_identity

    me = load_identity(keys / ("b" if server_side else "a"))
    peer = load_identity(keys / ("a" if server_side else "b"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(me.cert_path, me.key_path)
    ctx.load_verify_locations(cadata=peer.cert_der)
    return ctx


def _link_transport(kind: str, keys: Path | None, server_side: bool):
    from vramancer.link.keys import TrustStore, load_identity
    from vramancer.link.shm import ShmTransport
    from vramancer.link.tcp import TcpTransport
    from vramancer.link.tls import TlsTransport

    if kind == "tcp":
        return TcpTransport()
    if kind == "shm":
        return ShmTransport(slot_bytes=max(1 << 20, _BIG[0]))
    me, peer = ("b", "a") if server_side else ("a", "b")
    trust = TrustStore(keys / f"{me}.json", [load_identity(keys / peer).fingerprint])
    return TlsTransport(load_identity(keys / me), trust)


_BIG = [16 << 20]


def peer_main(args: argparse.Namespace) -> int:
    """The child: connect to the parent, then receive one-way runs and/or echo round trips."""
    runs = args.repeat + 1
    one_way = [] if args.big_bytes == 0 else [args.iters_big] * runs
    echo = [] if args.small_bytes == 0 else [args.iters_small] * runs
    _BIG[0] = args.big_bytes
    keys = Path(args.keys) if args.keys else None
    if args.peer == "plain":
        sock = socket.create_connection(("127.0.0.1", args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _plain_peer(sock, args, one_way, echo)
    elif args.peer == "ssl":
        raw = socket.create_connection(("127.0.0.1", args.port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _plain_peer(_tls_contexts(keys, False).wrap_socket(raw), args, one_way, echo)
    elif args.peer in ("tcp", "tls", "shm"):
        address = args.address if args.peer == "shm" else ("127.0.0.1", args.port)
        conn = _link_transport(args.peer, keys, False).connect(address)
        dest_big = np.empty(args.big_bytes // 4, dtype=np.float32)
        dest_small = np.empty(args.small_bytes, dtype=np.uint8)
        ack = np.zeros(1, dtype=np.uint8)
        for n in one_way:
            for _ in range(n):
                conn.recv(into=[dest_big])
            conn.send([ack])
        for n in echo:
            for _ in range(n):
                conn.recv(into=[dest_small])
                conn.send([dest_small])
        conn.close()
    elif args.peer == "gloo":
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=1, world_size=2)
        big = torch.empty(args.big_bytes, dtype=torch.uint8)
        small = torch.empty(args.small_bytes, dtype=torch.uint8)
        ack = torch.zeros(1, dtype=torch.uint8)
        for n in one_way:
            for _ in range(n):
                dist.recv(big, 0)
            dist.send(ack, 0)
        for n in echo:
            for _ in range(n):
                dist.recv(small, 0)
                dist.send(small, 0)
        dist.destroy_process_group()
    return 0


def _plain_peer(sock, args, one_way, echo) -> None:
    big = memoryview(bytearray(args.big_bytes))
    small = memoryview(bytearray(args.small_bytes))
    for n in one_way:
        for _ in range(n):
            _recv_exact(sock, big)
        sock.sendall(b"k")
    for n in echo:
        for _ in range(n):
            _recv_exact(sock, small)
            sock.sendall(small)
    sock.close()


# ---------------------------------------------------------------------------------------------- parent
def _spawn(kind: str, args: argparse.Namespace, big: int, small: int, port: int = 0, address: str = "",
           keys: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", kind, "--port", str(port),
           "--address", address, "--keys", str(keys or ""), "--repeat", str(args.repeat),
           "--iters-big", str(args.iters_big), "--iters-small", str(args.iters_small),
           "--big-bytes", str(big), "--small-bytes", str(small)]
    return subprocess.Popen(cmd, cwd=ROOT)


def _finish(child: subprocess.Popen) -> None:
    try:
        if child.wait(CHILD_TIMEOUT_S) != 0:
            raise RuntimeError(f"benchmark peer exited {child.returncode}")
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)
        raise


@dataclass
class _Pair:
    """One connected pair (this process and its peer child): timed operations and a clean-up."""

    one_way: Any = None            # one_way(n): n frames of --big-bytes, then the peer's ack
    round_trip: Any = None         # round_trip(n): n round trips of --small-bytes
    close: Any = None
    child: subprocess.Popen | None = None
    one_way_s: list[float] = field(default_factory=list)      # seconds per frame, each run
    round_trip_s: list[float] = field(default_factory=list)
    one_way_cpu_s: list[float] = field(default_factory=list)  # this process's CPU seconds per frame
    round_trip_cpu_s: list[float] = field(default_factory=list)

    def finish(self) -> None:
        if self.close is not None:
            self.close()
        if self.child is not None:
            _finish(self.child)


def _plain(args, big: int, small: int, tls_keys: Path | None = None) -> _Pair:
    server = socket.create_server(("127.0.0.1", 0))
    child = _spawn("ssl" if tls_keys else "plain", args, big, small, server.getsockname()[1], keys=tls_keys)
    server.settimeout(CHILD_TIMEOUT_S)
    sock, _ = server.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls_keys:
        sock = _tls_contexts(tls_keys, True).wrap_socket(sock, server_side=True)
    payload = memoryview(np.random.default_rng(0).integers(0, 255, big, dtype=np.uint8)) if big else None
    msg = memoryview(bytearray(small))
    back = memoryview(bytearray(small))
    ack = memoryview(bytearray(1))

    def one_way(n):
        for _ in range(n):
            sock.sendall(payload)
        _recv_exact(sock, ack)

    def round_trip(n):
        for _ in range(n):
            sock.sendall(msg)
            _recv_exact(sock, back)

    def close():
        sock.close()
        server.close()

    return _Pair(one_way, round_trip, close, child)


def _link(args, kind: str, big: int, small: int, keys: Path | None = None) -> _Pair:
    _BIG[0] = big
    t = _link_transport(kind, keys, True)
    if kind == "shm":
        address = os.path.join(tempfile.mkdtemp(prefix="vrm-link-bench-"), "shm.sock")
        listener = t.listen(address)
        child = _spawn(kind, args, big, small, address=address, keys=keys)
    else:
        listener = t.listen(("127.0.0.1", 0))
        child = _spawn(kind, args, big, small, listener.address[1], keys=keys)
    conn = listener.accept(timeout=CHILD_TIMEOUT_S)
    payload = np.random.default_rng(0).standard_normal(big // 4).astype(np.float32)
    msg = np.zeros(small, dtype=np.uint8)
    back = np.empty(small, dtype=np.uint8)
    ack = np.empty(1, dtype=np.uint8)

    def one_way(n):
        for _ in range(n):
            conn.send([payload])
        conn.recv(into=[ack])

    def round_trip(n):
        for _ in range(n):
            conn.send([msg])
            conn.recv(into=[back])

    def close():
        conn.close()
        listener.close()

    return _Pair(one_way, round_trip, close, child)


def _gloo(args, big: int, small: int) -> _Pair:
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = _spawn("gloo", args, big, small, port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    payload = torch.randint(0, 255, (big,), dtype=torch.uint8)
    msg = torch.zeros(small, dtype=torch.uint8)
    back = torch.empty(small, dtype=torch.uint8)
    ack = torch.empty(1, dtype=torch.uint8)

    def one_way(n):
        for _ in range(n):
            dist.send(payload, 1)
        dist.recv(ack, 1)

    def round_trip(n):
        for _ in range(n):
            dist.send(msg, 1)
            dist.recv(back, 1)

    return _Pair(one_way, round_trip, dist.destroy_process_group, child)


def _interleave(args, pairs: list[_Pair], what: str) -> None:
    """Run ``what`` ("one_way" or "round_trip") on every pair in turn, --repeat + 1 times (the first
    round a warm-up): each pair's runs are spread over the same stretch of time, so a change in the
    machine's load (other processes) touches ours and the anchors alike. The order turns by one pair
    each round: no pair always runs right after the same one (after gloo, whose threads may still be
    busy, or after a pair that left the caches cold)."""
    n = args.iters_big if what == "one_way" else args.iters_small
    for r in range(args.repeat + 1):
        k = r % len(pairs)
        for pair in pairs[k:] + pairs[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            getattr(pair, what)(n)
            dt, dc = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
            if r:
                getattr(pair, what + "_s").append(dt)
                getattr(pair, what + "_cpu_s").append(dc)

def _make_keys(root: Path) -> Path:
    from vramancer.link.keys import create_identity

    for name in ("a", "b"):
        create_identity(root / name, name=name)
    return root


def _row(metric, unit, ours, anchor_name, anchor, goal_op, goal, ours_cpu=0.0, anchor_cpu=0.0) -> Row:
    ratio = ours / anchor if anchor else float("inf")
    passed = ratio >= goal if goal_op == ">=" else ratio <= goal
    return Row(metric, unit, ours, anchor_name, anchor, ratio, f"{goal_op} {goal:g}x", passed, ours_cpu, anchor_cpu)


def measure(args: argparse.Namespace) -> list[Row]:
    big, small = args.big_bytes, args.small_bytes
    gbps = lambda secs: big / statistics.median(secs) / 1e9  # noqa: E731
    usec = lambda secs: statistics.median(secs) * 1e6  # noqa: E731
    try:
        import torch.distributed  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    with tempfile.TemporaryDirectory(prefix="vrm-link-keys-") as tmp:
        keys = _make_keys(Path(tmp))
        pairs: dict[str, _Pair] = {}
        try:
            # every pair connected first (children wait, blocked, for their turn), then timed in turns
            pairs["tcp"] = _link(args, "tcp", big, small)
            pairs["plain"] = _plain(args, big, small)
            if has_torch:
                pairs["gloo"] = _gloo(args, big, small)
            pairs["tls"] = _link(args, "tls", big, 0, keys)
            pairs["ssl"] = _plain(args, big, 0, tls_keys=keys)
            pairs["shm"] = _link(args, "shm", big, 0)
            _interleave(args, list(pairs.values()), "one_way")
            _interleave(args, [p for k, p in pairs.items() if k in ("tcp", "plain", "gloo")], "round_trip")
        finally:
            for pair in pairs.values():
                pair.finish()
    ow = {k: p.one_way_s for k, p in pairs.items()}
    rt = {k: p.round_trip_s for k, p in pairs.items()}
    ow_cpu = {k: usec(p.one_way_cpu_s) for k, p in pairs.items()}
    rt_cpu = {k: usec(p.round_trip_cpu_s) for k, p in pairs.items() if p.round_trip_cpu_s}
    one_way = f"TCP one-way {big >> 10} KiB"
    rows = [_row(one_way, "GB/s", gbps(ow["tcp"]), "python socket", gbps(ow["plain"]), ">=", 0.9,
                 ow_cpu["tcp"], ow_cpu["plain"])]
    if has_torch:
        rows.append(_row(one_way, "GB/s", gbps(ow["tcp"]), "torch gloo", gbps(ow["gloo"]), ">=", 1.0,
                         ow_cpu["tcp"], ow_cpu["gloo"]))
    round_trip = f"round trip {small >> 10 or small} {'KiB' if small >= 1024 else 'B'}"
    rows.append(_row(round_trip, "us", usec(rt["tcp"]), "python socket", usec(rt["plain"]), "<=", 1.2,
                     rt_cpu["tcp"], rt_cpu["plain"]))
    if has_torch:
        rows.append(_row(round_trip, "us", usec(rt["tcp"]), "torch gloo", usec(rt["gloo"]), "<=", 0.5,
                         rt_cpu["tcp"], rt_cpu["gloo"]))
    rows.append(_row(f"TLS one-way {big >> 10} KiB", "GB/s", gbps(ow["tls"]), "python ssl", gbps(ow["ssl"]), ">=", 0.9,
                     ow_cpu["tls"], ow_cpu["ssl"]))
    rows.append(_row(f"shm one-way {big >> 10} KiB", "GB/s", gbps(ow["shm"]), "Link TCP", gbps(ow["tcp"]), ">=", 2.0,
                     ow_cpu["shm"], ow_cpu["tcp"]))
    return rows


def _table(rows: list[Row]) -> str:
    head = (f"{'metric':<22} {'ours':>10} {'anchor':>22} {'ratio':>7} {'goal':>8}  pass  "
            f"{'cpu_us/op':>20}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.metric:<22} {r.ours:>7.3g} {r.unit:<2} {r.anchor_name + ' ' + format(r.anchor, '.3g'):>22} "
                     f"{r.ratio:>6.2f}x {r.goal:>8}  {'PASS' if r.passed else 'FAIL'}  "
                     f"{format(r.ours_cpu_us, '.3g') + ' vs ' + format(r.anchor_cpu_us, '.3g'):>20}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--iters-big", type=int, default=10, help="one-way frames per run")
    p.add_argument("--iters-small", type=int, default=1000, help="round trips per run")
    p.add_argument("--big-bytes", type=int, default=16 << 20)
    p.add_argument("--small-bytes", type=int, default=8 << 10)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--address", default="", help=argparse.SUPPRESS)
    p.add_argument("--keys", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.big_bytes % 4 or args.big_bytes < 0 or args.small_bytes < 0 or not args.peer and not (
            args.big_bytes and args.small_bytes):
        print("link.py: --big-bytes must be a positive multiple of 4, --small-bytes positive", file=sys.stderr)
        return 2
    if args.peer:
        return peer_main(args)
    from vramancer.link.transport import hot_path_name

    rows = measure(args)
    print(_table(rows))
    print(f"Link steady state: {hot_path_name()}")
    if args.json:
        args.json.write_text(json.dumps({"schema": 1, "hot_path": hot_path_name(), "rows": [asdict(r) for r in rows]},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
