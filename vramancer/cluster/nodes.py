"""The nodes of a cluster as VRAMancer sees them: what each one holds and how fast the links between
them are, measured over the Link itself.

One ``NodeAgent`` runs on every node (a Ray actor pinned to it, started by ``discover`` and killed
after): it reports the node's devices (``vramancer.devices``, from the spec the node was joined
with: ``VRAMANCER_NODE_DEVICES``, default ``auto``), its Link identity (the key fingerprint of
``vramancer keys``), and serves a probe endpoint: mutual TLS 1.3 pinned to the fingerprints of the
other agents (the set the driver read over Ray's token-authenticated control plane; the node's own
revoked keys still refused). ``discover`` then has each agent probe every other one:

    RTT        the median of ``PING_ROUNDS`` round trips of one 8-byte frame
    bandwidth  ``probe_bytes`` sent as one frame and acknowledged, minus one RTT

Everything crossing Ray is JSON-ready (str, int, float, lists, dicts); tensors only cross the Link.
Node names are ``node1`` (the head), ``node2``... by address, and a device's cluster id is
``<node>/<device id>`` (``node2/cuda:0``).
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..devices.device import Device

__all__ = ["NodeInfo", "LinkMeasure", "ClusterView", "NodeAgent", "discover", "node_of", "PING_ROUNDS",
           "PROBE_BYTES", "cluster_trust", "node_ray_ids"]

log = logging.getLogger("vramancer.cluster")

PING_ROUNDS = 5
PROBE_BYTES = 16 << 20
_ACK_ABOVE_BYTES = 64 << 10


@dataclass
class NodeInfo:
    """One node: ``name`` (node1...), its Ray node id and address, whether it is the Ray head, its
    Link key fingerprint (None without an identity), its Link probe endpoint, its devices."""

    name: str
    ray_id: str
    address: str
    is_head: bool
    hostname: str
    fingerprint: str | None
    link_host: str
    link_port: int
    devices: list[Device] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["devices"] = [dict(dev.to_dict(), id=f"{self.name}/{dev.id}") for dev in self.devices]
        return d


@dataclass(frozen=True)
class LinkMeasure:
    """The Link from node ``src`` to node ``dst``, measured: round trip and one-way bandwidth."""

    src: str
    dst: str
    rtt_s: float
    bandwidth_bytes_per_s: float
    probe_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClusterView:
    address: str
    nodes: list[NodeInfo]
    links: list[LinkMeasure]

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def link(self, src: str, dst: str) -> LinkMeasure | None:
        return next((lk for lk in self.links if lk.src == src and lk.dst == dst), None)

    def to_dict(self) -> dict:
        return {"schema": 1, "address": self.address, "nodes": [n.to_dict() for n in self.nodes],
                "links": [lk.to_dict() for lk in self.links]}


def node_of(device_id: str) -> str:
    """"node2/cuda:0" -> "node2" (a device id without a node is the driver's: "")."""
    return device_id.split("/", 1)[0] if "/" in device_id else ""


def cluster_trust(fingerprints: list[str]) -> Any:
    """A TrustStore (kept in memory) of exactly ``fingerprints``, less what this node revoked."""
    from ..link.keys import TrustStore, keys_dir

    local = TrustStore.load()
    revoked = list(local.revoked)
    store = TrustStore(keys_dir() / "cluster-trust.json", [], revoked)
    for fp in fingerprints:
        if fp and fp not in revoked:
            store.trusted.append(fp)
    return store


class NodeAgent:
    """The per-node agent (a Ray actor body; also usable in-process). ``host``: where its probe
    endpoint binds (the node's address as Ray knows it)."""

    def __init__(self, host: str) -> None:
        import socket

        from .. import envs
        from ..devices.spec import parse_devices
        from ..errors import VramancerError

        self.host = host
        self.hostname = socket.gethostname()
        self.note = ""
        self.identity = None
        try:
            from ..link.keys import load_identity

            self.identity = load_identity()
        except VramancerError as e:
            self.note = str(e)
        spec = envs.get("VRAMANCER_NODE_DEVICES")
        try:
            self.devices = parse_devices(spec)
        except VramancerError as e:
            self.devices = []
            self.note = (self.note + "; " if self.note else "") + f"devices {spec!r}: {e}"
        self.listener = None
        self.peers: list[str] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def report(self) -> str:
        import json

        fp = self.identity.fingerprint if self.identity else None
        return json.dumps({"hostname": self.hostname, "fingerprint": fp,
                           "devices": [d.to_dict() for d in self.devices], "note": self.note,
                           "link_host": self.host, "link_port": self.listen()})

    def listen(self) -> int:
        """Start the probe endpoint (once); its port."""
        if self.identity is None:
            return 0
        if self.listener is None:
            from ..link.tls import TlsTransport

            self.transport = TlsTransport(self.identity, cluster_trust(self.peers))
            self.listener = self.transport.listen((self.host, 0))
            self._thread = threading.Thread(target=self._serve, name="vramancer-probe", daemon=True)
            self._thread.start()
        return int(self.listener.address[1])

    def set_peers(self, fingerprints: list[str]) -> None:
        self.peers = list(fingerprints)
        if self.listener is not None:
            self.transport.trust = cluster_trust(self.peers)

    def _serve(self) -> None:
        from ..link.errors import LinkError

        while not self._closed:
            try:
                conn = self.listener.accept(timeout=None)
            except LinkError:
                if self._closed:
                    return
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: Any) -> None:
        import numpy as np

        from ..link.errors import LinkError
        from ..link.frame import FrameType

        ack = np.zeros(1, dtype=np.uint8)
        try:
            while True:
                f = conn.recv()
                if f.frame_type != FrameType.TENSORS:
                    break
                big = sum(d.byte_length for d in f.descs) > _ACK_ABOVE_BYTES
                conn.send([ack] if big else f.tensors)
        except LinkError:
            pass
        finally:
            conn.close()

    def probe(self, host: str, port: int, fingerprint: str, probe_bytes: int = PROBE_BYTES) -> str:
        """Round trip and bandwidth to another agent's endpoint (JSON: rtt_s, bandwidth_bytes_per_s)."""
        import json

        import numpy as np

        from ..link.tls import TlsTransport

        tr = TlsTransport(self.identity, cluster_trust([fingerprint]))
        conn = tr.connect((host, int(port)))
        try:
            ping = np.zeros(1, dtype=np.int64)
            conn.send([ping])
            conn.recv()   # warm-up
            rtts = []
            for _ in range(PING_ROUNDS):
                t0 = time.perf_counter()
                conn.send([ping])
                conn.recv()
                rtts.append(time.perf_counter() - t0)
            rtt = statistics.median(rtts)
            payload = np.ones(max(probe_bytes, _ACK_ABOVE_BYTES + 1), dtype=np.uint8)
            t0 = time.perf_counter()
            conn.send([payload])
            conn.recv()
            dt = max(time.perf_counter() - t0 - rtt, 1e-9)
        finally:
            conn.close()
        return json.dumps({"rtt_s": rtt, "bandwidth_bytes_per_s": payload.nbytes / dt, "probe_bytes": payload.nbytes})

    def close(self) -> None:
        self._closed = True
        if self.listener is not None:
            self.listener.close()


def _ordered_nodes(ray_nodes: list[dict]) -> list[dict]:
    alive = [n for n in ray_nodes if n.get("Alive")]
    return sorted(alive, key=lambda n: ("node:__internal_head__" not in n.get("Resources", {}),
                                        n["NodeManagerAddress"], n["NodeID"]))


def node_ray_ids() -> dict[str, tuple[str, str]]:
    """node name -> (Ray node id, address) of the alive nodes of the connected cluster."""
    import ray

    return {f"node{i + 1}": (n["NodeID"], n["NodeManagerAddress"]) for i, n in enumerate(_ordered_nodes(ray.nodes()))}


def pinned(node_id: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def discover(address: str = "", probe_bytes: int = PROBE_BYTES, measure: bool = True) -> ClusterView:
    """Every alive node of the connected Ray cluster: its report, and (``measure``) each link."""
    import json

    import ray

    order = _ordered_nodes(ray.nodes())
    agent_cls = ray.remote(num_cpus=0)(NodeAgent)
    agents = [agent_cls.options(scheduling_strategy=pinned(n["NodeID"])).remote(n["NodeManagerAddress"])
              for n in order]
    try:
        reports = [json.loads(r) for r in ray.get([a.report.remote() for a in agents])]
        nodes = []
        for i, (n, r) in enumerate(zip(order, reports)):
            nodes.append(NodeInfo(
                name=f"node{i + 1}", ray_id=n["NodeID"], address=n["NodeManagerAddress"],
                is_head="node:__internal_head__" in n.get("Resources", {}), hostname=r["hostname"],
                fingerprint=r["fingerprint"], link_host=r["link_host"], link_port=int(r["link_port"]),
                devices=[Device.from_dict(d) for d in r["devices"]], note=r["note"]))
        links: list[LinkMeasure] = []
        if measure:
            fps = [n.fingerprint for n in nodes if n.fingerprint]
            ray.get([a.set_peers.remote(fps) for a in agents])
            for i, src in enumerate(nodes):
                for j, dst in enumerate(nodes):
                    if i == j or not src.fingerprint or not dst.fingerprint:
                        continue
                    m = json.loads(ray.get(agents[i].probe.remote(dst.link_host, dst.link_port, dst.fingerprint,
                                                                  probe_bytes)))
                    links.append(LinkMeasure(src.name, dst.name, m["rtt_s"], m["bandwidth_bytes_per_s"],
                                             m["probe_bytes"]))
    finally:
        for a in agents:
            try:
                ray.get(a.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the agent may be gone already; it is killed next
                pass
            ray.kill(a)
    return ClusterView(address, nodes, links)
