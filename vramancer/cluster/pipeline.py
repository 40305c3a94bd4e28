"""Stage workers on the nodes of a cluster, and the driver that runs generation through them.

    connect("10.0.0.1:6379")                                  # control.connect: token auth
    view = discover()                                         # nodes, devices, measured links
    plan = plan_cluster("./model", view, driver="node1")
    with ClusterPipeline(plan, view, "./model") as pipe:      # one StageWorker actor per stage
        tokens = pipe.generate([1, 15043, 29892], max_new_tokens=32)   # greedy
        pipe.stats()                                          # where the time went, per stage

Control goes over Ray; tensors never do. Each ``StageWorker`` is a Ray actor pinned to its stage's
node (``NodeAffinitySchedulingStrategy``, not soft) and, for a CUDA stage, given one GPU slot with
the plan's device index kept (Ray's CUDA_VISIBLE_DEVICES rewrite is turned off for it). It loads its
block range (``stage.StageModel``) from the node's own copy of the checkpoint when the folder is
there, else receives exactly its tensors from the driver over the cloud bridge (``fetch_tensors``:
chunked, sha256-verified, cached under the node's cache folder, resumable), then listens on the
node's address and dials the next stage (the last one dials the driver).

Each hop gets the transport the plan's rule picks from where its ends live (``planning.hop_transport``;
``Plan.hops`` records it): two processes on one node talk over shared memory (link/shm.py: the
listening end binds a Unix socket in a fresh 0700 folder, whose path reaches the dialer as JSON over
Ray; each side creates its own segment for the frames it sends and the other maps it); two nodes
over Link TLS: mutual TLS 1.3 pinned to the one fingerprint expected at that end (each node's
identity key as its agent reported it over the token-authenticated control plane; a key the node
revoked is refused). The driver's own node is the Ray node its process runs on. With
``--trusted-network`` hops between nodes may go plaintext: tcp (link/tcp.py, the listener on the
node's address) or torch (link/dist.py): then the driver and every stage join one torch.distributed
world for this pipeline (rank 0 the driver, rank i + 1 stage i; gloo, plus NCCL for hops between two
CUDA stages), rendezvous at a TCPStore the driver opens on its Link address, gloo bound to the
interface that holds each process's Link address; the world is torn down with the pipeline. A hop
takes the transport the plan recorded for it (``Plan.hops``) when its ends are where the plan put
them, else the rule's (``hop_transport``); plaintext without ``trusted_network`` is refused before
anything starts (one line, exit 2).

Per token the driver sends ``[ctrl, token ids]`` to the first stage; each stage runs its blocks and
sends ``[ctrl, hidden states]`` on; the last stage sends ``[ctrl, logits of the last position]``
back, and the driver picks the token (greedy, or drawn by a sampler). ``ctrl`` is an int64 vector
(op, start): op 1 runs a forward whose inputs start at token ``start`` of the sequence (0: a new
sequence, caches reset).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInputError, VramancerError
from .nodes import ClusterView, cluster_trust, node_of, pinned

__all__ = ["StageWorker", "ClusterPipeline", "StageTiming", "PipelineStats", "OP_FORWARD", "shm_slot_bytes",
           "join_group", "gloo_interface"]

log = logging.getLogger("vramancer.cluster")

OP_FORWARD = 1
_CTRL_LEN = 2


def shm_slot_bytes(plan: Any, config: dict) -> int:
    """The shm slot (one frame's payload) of a pipeline: the control pair plus the largest of a
    prefill chunk's hidden states (4 bytes an element at most), its token ids and one row of logits."""
    hidden = int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0)
    vocab = int(config.get("vocab_size") or 0)
    chunk = max(1, plan.workload.prefill_chunk)
    need = 8 * _CTRL_LEN + max(4 * chunk * hidden, 8 * chunk, 4 * vocab)
    return max(1 << 16, (need + 4095) // 4096 * 4096)


def _listen(kind: str, host: str, identity: Any, slot_bytes: int, peer_rank: int = 0,
            device: str = "cpu") -> tuple[Any, Any, str]:
    """(transport, listener, private folder or "") of a hop's listening end. ``peer_rank`` / ``device``:
    a torch hop's sender rank and the device its tensors travel on (cpu: gloo, cuda: NCCL)."""
    from ..link.shm import ShmTransport
    from ..link.tls import TlsTransport

    if kind == "torch":
        from ..link.dist import TorchDistTransport

        td = TorchDistTransport(device=device)
        return td, td.listen(peer_rank), ""
    if kind == "tcp":
        from ..link.tcp import TcpTransport

        tc = TcpTransport(trusted_network=True)
        return tc, tc.listen((host, 0)), ""
    if kind == "shm":
        import tempfile

        folder = tempfile.mkdtemp(prefix="vramancer-hop-")     # 0700: only this user reaches the socket
        tr: Any = ShmTransport(slot_bytes=slot_bytes)
        return tr, tr.listen(str(Path(folder) / "s")), folder
    tr = TlsTransport(identity, cluster_trust([]))
    return tr, tr.listen((host, 0)), ""


def _endpoint(kind: str, listener: Any, rank: int = 0, device: str = "cpu") -> dict:
    """A hop's listening end as JSON; a torch hop's: the listening process's rank and the device."""
    if kind == "shm":
        return {"transport": "shm", "path": listener.address}
    if kind == "torch":
        return {"transport": "torch", "rank": rank, "device": device}
    return {"transport": kind, "host": listener.address[0], "port": int(listener.address[1])}


def _dial(end: dict, identity: Any, fingerprint: str, slot_bytes: int) -> Any:
    """Connect to a hop's listening end described by ``end`` (``_endpoint``)."""
    from ..link.shm import ShmTransport
    from ..link.tls import TlsTransport

    if end["transport"] == "torch":
        from ..link.dist import TorchDistTransport

        return TorchDistTransport(device=end["device"]).connect(int(end["rank"]))
    if end["transport"] == "tcp":
        from ..link.tcp import TcpTransport

        return TcpTransport(trusted_network=True).connect((end["host"], int(end["port"])))
    if end["transport"] == "shm":
        return ShmTransport(slot_bytes=slot_bytes).connect(end["path"])
    return TlsTransport(identity, cluster_trust([fingerprint])).connect((end["host"], int(end["port"])))


def gloo_interface(address: str) -> str | None:
    """The network interface that holds ``address`` (gloo binds it: GLOO_SOCKET_IFNAME), or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None


def join_group(group: dict, host: str, device: str, timeout_s: float, store: Any = None) -> None:
    """Join this pipeline's torch.distributed world (``group``: store host and port, world, rank,
    backend) with gloo bound to the interface of ``host``; a CUDA ``device`` becomes this process's
    current device (NCCL's). ``store``: the driver's own (master) TCPStore."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        raise BadInputError("this process is already in a torch.distributed world: one pipeline with torch "
                            "hops per process")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(group["host"], int(group["port"]), int(group["world"]), is_master=False,
                              timeout=timeout)
    ifname = gloo_interface(host)
    old = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    try:
        dist.init_process_group(group["backend"], store=store, rank=int(group["rank"]),
                                world_size=int(group["world"]), timeout=timeout)
    finally:
        if ifname:
            if old is None:
                os.environ.pop("GLOO_SOCKET_IFNAME", None)
            else:
                os.environ["GLOO_SOCKET_IFNAME"] = old


def _refuse_revoked(nodes: list[Any]) -> None:
    """PeerRefusedError naming the key of the first node whose key this node revoked."""
    from ..link.errors import PeerRefusedError
    from ..link.keys import TrustStore

    revoked = set(TrustStore.load().revoked)
    for n in nodes:
        if n.fingerprint in revoked:
            log.warning("cluster: refused revoked peer %s (%s)", n.fingerprint, n.name)
            raise PeerRefusedError(f"refused revoked peer {n.fingerprint} at {n.name}", n.fingerprint)


def _remove_folder(folder: str) -> None:
    import shutil

    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class StageTiming:
    """Seconds one stage spent, summed over the forwards it ran: waiting for its input (includes
    the previous stages' work), computing, and sending its output."""

    stage: int
    node: str
    device: str
    forwards: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0
    send_s: float = 0.0
    load_s: float = 0.0
    loaded_from: str = ""
    bytes_received: int = 0
    bytes_sent: int = 0
    bridge: dict = field(default_factory=dict)   # tensors, bytes, network_bytes, cache_bytes (bridge loads)
    transport_in: str = ""      # the hop from the previous stage (or the driver): shm, tls, tcp or torch
    transport_out: str = ""     # the hop to the next stage (or the driver)


@dataclass
class PipelineStats:
    tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stages: list[StageTiming] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else 0.0


class StageWorker:
    """The body of a stage actor (also usable in-process, as the tests' single-process check does)."""

    def __init__(self) -> None:
        self.model = None
        self.listener = None
        self.prev = None
        self.next = None
        self.thread: threading.Thread | None = None
        self.timing: dict[str, Any] = {}
        self.bridge_stats: dict[str, int] = {}
        self.error = ""
        self.folder = ""
        self.hops = {"in": "", "out": ""}

    def setup(self, spec_json: str) -> str:
        """Load the stage and listen for the previous hop. ``spec_json``: plan (JSON), index, config
        (dict), folder, bridge (host, port, fingerprint) or null, names (bridge tensors), host, cache_dir,
        listen (the previous hop's transport: tls, shm, tcp or torch), listen_device (the torch device of
        a torch hop's tensors), trusted_network (tcp / torch are refused without it), group (the
        torch.distributed world to join, or null), timeout_s, slot_bytes (shm).
        Returns JSON: the listening end (transport, host and port or path), fingerprint, load_s, loaded_from."""
        import torch

        from ..link.keys import load_identity
        from ..plan.plan import Plan
        from .stage import StageModel, read_stage_tensors

        spec = json.loads(spec_json)
        t0 = time.perf_counter()
        plan = Plan.from_json(spec["plan"])
        index = int(spec["index"])
        st = plan.stages[index]
        device = st.torch_device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInputError(f"stage {index} is planned on {device}, which this node's torch cannot see")
        self.identity = load_identity()
        folder = spec.get("folder")
        if folder and (Path(folder) / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder)
            tensors = read_stage_tensors(folder, spec["names"])
            loaded_from = f"local copy {folder}"
        elif spec.get("bridge"):
            from transformers import AutoConfig

            from ..link.bridge import FetchStats, fetch_tensors
            from ..link.tls import TlsTransport

            cfg = dict(spec["config"])
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            b = spec["bridge"]
            tr = TlsTransport(self.identity, cluster_trust([b["fingerprint"]]))
            stats = FetchStats()
            tensors = fetch_tensors(lambda: tr.connect((b["host"], int(b["port"]))), spec["names"],
                                    cache_dir=spec.get("cache_dir"), device="cpu", stats=stats)
            loaded_from = f"cloud bridge {b['host']}:{b['port']}"
            self.bridge_stats = {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size()
                                                                       for t in tensors.values()),
                                 "network_bytes": stats.chunk_bytes_from_network,
                                 "cache_bytes": stats.chunk_bytes_from_cache}
        else:
            raise BadInputError(f"stage {index}: no checkpoint at {folder} on this node, and no cloud bridge")
        self.model = StageModel.from_tensors(config, plan, index, tensors, device)
        del tensors
        self.index = index
        kind = spec.get("listen", "tls")
        if kind not in ("tls", "shm", "tcp", "torch"):
            raise BadInputError(f"stage {index}: unknown hop transport {kind!r}")
        if kind in ("tcp", "torch") and not spec.get("trusted_network"):
            raise BadInputError(f"stage {index}: a plaintext hop ({kind}) needs --trusted-network")
        group = spec.get("group")
        if group:     # this pipeline's torch.distributed world: every process joins before any hop is wired
            join_group(group, spec["host"], device, float(spec.get("timeout_s") or 300))
        self.slot_bytes = int(spec.get("slot_bytes") or (1 << 20))
        hop_device = spec.get("listen_device", "cpu")
        self.transport, self.listener, self.folder = _listen(kind, spec["host"], self.identity, self.slot_bytes,
                                                             index, hop_device)
        self.hops["in"] = kind
        self.timing = {"load_s": time.perf_counter() - t0, "loaded_from": loaded_from, "forwards": 0,
                       "wait_s": 0.0, "compute_s": 0.0, "send_s": 0.0}
        rank = index + 1
        return json.dumps({**_endpoint(kind, self.listener, rank, hop_device),
                           "fingerprint": self.identity.fingerprint, **self.timing})

    def wire(self, spec_json: str) -> str:
        """``spec_json``: prev_fingerprint (trusted on a TLS listener; shm has no key: a Unix socket
        in a 0700 folder reaches only this user), next (the next hop's end: transport, host and port
        or path) and next_fingerprint. Dials the next hop and runs the stage loop in a thread.
        Returns JSON {} once dialed."""
        spec = json.loads(spec_json)
        if self.hops["in"] == "tls":
            self.transport.trust = cluster_trust([spec["prev_fingerprint"]])
        self._ready = threading.Event()
        # accept the previous hop while dialing the next one: every stage dials at once
        self.thread = threading.Thread(target=self._loop, name=f"vramancer-stage{self.index}", daemon=True)
        self.thread.start()
        try:
            self.next = _dial(spec["next"], self.identity, spec["next_fingerprint"], self.slot_bytes)
            self.hops["out"] = spec["next"]["transport"]
        finally:
            self._ready.set()
        return "{}"

    def _loop(self) -> None:
        import torch

        from ..link.errors import LinkError
        from ..link.frame import FrameType, torch_buffers

        try:
            self.prev = self.listener.accept(timeout=120)
            self._ready.wait()
            if self.next is None:
                raise BadInputError(f"stage {self.index}: the next hop could not be reached")
            tm = self.timing
            # a torch hop receives into tensors on its own device (NCCL: CUDA), the others into host tensors
            factory = None if self.hops["in"] == "torch" else torch_buffers
            while True:
                t0 = time.perf_counter()
                f = self.prev.recv(factory=factory)
                t1 = time.perf_counter()
                if f.frame_type != FrameType.TENSORS:
                    break
                ctrl, x = f.tensors
                if ctrl.numel() != _CTRL_LEN or int(ctrl[0]) != OP_FORWARD:
                    raise BadInputError(f"stage {self.index}: unknown control {ctrl.tolist()}")
                y = self.model.forward(x, int(ctrl[1]))
                if y.device.type == "cuda":
                    torch.cuda.synchronize(y.device)
                t2 = time.perf_counter()
                if tm["forwards"]:        # the first wait includes wiring the pipeline
                    tm["wait_s"] += t1 - t0
                tm["forwards"] += 1       # counted before the send: the driver may ask as soon as it lands
                tm["compute_s"] += t2 - t1
                self.next.send([ctrl, y])
                tm["send_s"] += time.perf_counter() - t2
        except (LinkError, VramancerError) as e:
            self.error = str(e)
            log.warning("stage %s stopped: %s", getattr(self, "index", "?"), e)
        except Exception as e:  # noqa: BLE001 - a stage's failure is reported to the driver, one line
            self.error = f"{type(e).__name__}: {e}"
            log.warning("stage %s failed: %s", getattr(self, "index", "?"), self.error)
        finally:
            if self.next is not None and not self.next.closed:
                try:
                    self.next.send_control(FrameType.CLOSE)
                except LinkError:
                    pass
                self.next.close()

    def stats(self) -> str:
        t = dict(self.timing)
        t["error"] = self.error
        t["bridge"] = self.bridge_stats
        t["bytes_received"] = self.prev.bytes_received if self.prev is not None else 0
        t["bytes_sent"] = self.next.bytes_sent if self.next is not None else 0
        t["transport_in"], t["transport_out"] = self.hops["in"], self.hops["out"]
        return json.dumps(t)

    def close(self) -> None:
        for c in (self.prev, self.next, self.listener):
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing what may already be closed
                    pass
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self.model is not None:
            self.model.close()
            self.model = None
        _remove_folder(self.folder)
        self.folder = ""


class ClusterPipeline:
    """Stage actors for ``plan`` over ``view``'s nodes and the driver's two Link ends.

    ``folder``: the checkpoint on the driver's machine (and, when a node has the same path, its local
    copy). ``bridge``: serve stages to nodes without a copy over the cloud bridge (default on);
    ``local_copies`` False: every stage comes over the bridge, copies or not.
    ``link_host``: where the driver's Link endpoints bind (default: this node's address in Ray).
    ``trusted_network`` (--trusted-network): plaintext hops (tcp, torch) may run; ``link`` (--link):
    the hops' rule where the plan records none for their ends (``planning.hop_transport``)."""

    def __init__(self, plan: Any, view: ClusterView, folder: str | Path, *, bridge: bool = True,
                 local_copies: bool = True, link_host: str | None = None, cache_dir: str | None = None,
                 timeout_s: float = 300.0, trusted_network: bool = False, link: str = "auto") -> None:
        import ray

        from ..link.keys import load_identity
        from ..models.checkpoint import read_config
        from .planning import check_hops, check_link
        from .stage import stage_tensor_names

        check_link(link, trusted_network)
        check_hops(plan.hops, trusted_network)      # before anything starts: one line, exit 2

        self.plan = plan
        self.view = view
        self.folder = Path(folder)
        self.timeout_s = timeout_s
        self.identity = load_identity()
        self.link_host = link_host or ray.util.get_node_ip_address()
        self.actors: list[Any] = []
        self._bridge = None
        self._bridge_threads: list[threading.Thread] = []
        self.first = self.last = None
        self._closed = False
        self._folder = ""
        self.timing = PipelineStats()
        self._group = False
        self.trusted_network = trusted_network
        self.transports: list[str] = []
        try:
            nodes = [self._node(st.device) for st in plan.stages]
            for n in nodes:
                if not n.fingerprint:
                    raise BadInputError(f"{n.name} has no Link identity: run `vramancer keys init` there")
            fps = [n.fingerprint for n in nodes]
            _refuse_revoked(nodes)      # shm hops check no key: a node this one revoked gets no stage at all
            here = ray.get_runtime_context().get_node_id()
            self.driver_node = next((n.name for n in view.nodes if n.ray_id == here), "")
            # hop k: driver -> stage 0, ..., last stage -> driver
            self.transports, devices = self._transports(plan, trusted_network, link)
            group = self._open_group(devices) if "torch" in self.transports else None
            config = read_config(self.folder / "config.json")
            slot = shm_slot_bytes(plan, config)
            bridge_spec = self._start_bridge(fps) if bridge else None
            worker_cls = ray.remote(num_cpus=0)(StageWorker)
            specs = []
            for i, (st, n) in enumerate(zip(plan.stages, nodes)):
                opts: dict[str, Any] = {"scheduling_strategy": pinned(n.ray_id)}
                if st.torch_device.startswith("cuda"):
                    opts["num_gpus"] = 1
                    opts["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
                self.actors.append(worker_cls.options(**opts).remote())
                specs.append(json.dumps({
                    "plan": plan.to_json(indent=None), "index": i, "config": config,
                    "folder": str(self.folder) if local_copies else None,
                    "names": stage_tensor_names(self.folder, plan, i), "bridge": bridge_spec,
                    "host": n.link_host or n.address, "cache_dir": cache_dir,
                    "listen": self.transports[i], "listen_device": devices[i], "slot_bytes": slot,
                    "trusted_network": trusted_network, "timeout_s": timeout_s,
                    "group": dict(group[0], rank=i + 1) if group else None}))
            refs = [a.setup.remote(s) for a, s in zip(self.actors, specs)]
            if group:   # the driver joins the world (rank 0) while the stages do
                self._join(group)
            ends = [json.loads(r) for r in self._get(refs)]
            if group:
                self._group_thread.join(self.timeout_s)
                if self._group_thread.is_alive() or self._group_errors:
                    why = self._group_errors[0] if self._group_errors else "timeout"
                    raise VramancerError(f"the driver could not join the pipeline's torch.distributed world: {why}")
            self.loads = ends
            for e, n in zip(ends, nodes):
                if e["fingerprint"] != n.fingerprint:
                    raise BadInputError(f"{n.name}: the stage's key {e['fingerprint']} is not the node's "
                                        f"{n.fingerprint}")
            # the driver's ends: it dials stage 0, the last stage dials the driver's listener
            back = self.transports[-1]
            n_st = len(plan.stages)
            self._in, listener, self._folder = _listen(back, self.link_host, self.identity, slot, n_st, devices[-1])
            if back == "tls":
                self._in.trust = cluster_trust([fps[-1]])
            try:
                wires = []
                for i, a in enumerate(self.actors):
                    prev_fp = self.identity.fingerprint if i == 0 else fps[i - 1]
                    if i + 1 < len(self.actors):
                        nxt, nfp = ends[i + 1], fps[i + 1]
                    else:
                        nxt, nfp = _endpoint(back, listener, 0, devices[-1]), self.identity.fingerprint
                    wires.append(a.wire.remote(json.dumps({"prev_fingerprint": prev_fp, "next_fingerprint": nfp,
                                                           "next": nxt})))
                accepted: list[Any] = []

                def accept_last() -> None:
                    try:
                        accepted.append(listener.accept(timeout=self.timeout_s))
                    except VramancerError as e:
                        accepted.append(e)

                waiter = threading.Thread(target=accept_last, daemon=True)
                waiter.start()
                self.first = _dial(ends[0], self.identity, fps[0], slot)
                self._get(wires)
                waiter.join(self.timeout_s)
                if not accepted or isinstance(accepted[0], BaseException):
                    why = accepted[0] if accepted else "timeout"
                    raise VramancerError(f"the last stage did not connect back: {why}")
                self.last = accepted[0]
            finally:
                listener.close()
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------------------
    def _transports(self, plan: Any, trusted: bool, link: str) -> tuple[list[str], list[str]]:
        """Each hop's transport (the plan's where its ends are where the plan put them, else the rule's)
        and the device a torch hop's tensors travel on (cuda: NCCL between two CUDA ends; else cpu)."""
        from .planning import hop_transport, pipeline_ends

        ends = pipeline_ends(plan, self.driver_node)
        hops = plan.hops if len(plan.hops) == len(ends) - 1 else []
        out, devices = [], []
        for k, ((src, a, da), (_, b, db)) in enumerate(zip(ends, ends[1:])):
            if hops and (hops[k].src_node, hops[k].dst_node) == (a, b):
                t = hops[k].transport
                if t == "shm" and a != b:
                    raise BadInputError(f"the plan's hop {src} -> {hops[k].dst} is shm between {a} and {b}: "
                                        "shared memory needs both ends on one node (plan again)")
            else:
                t = hop_transport(a, b, trusted=trusted, link=link, src_device=da, dst_device=db)[0]
            out.append(t)
            devices.append("cuda" if t == "torch" and da.startswith("cuda") and db.startswith("cuda") else "cpu")
        return out, devices

    def _open_group(self, devices: list[str]) -> tuple[dict, Any]:
        """The torch.distributed world of this pipeline's torch hops: (its spec, the master store)."""
        import datetime

        import torch.distributed as dist

        if dist.is_initialized():
            raise BadInputError("this process is already in a torch.distributed world: one pipeline with "
                                "torch hops per process")
        world = len(self.plan.stages) + 1
        store = dist.TCPStore(self.link_host, 0, world, is_master=True,
                              timeout=datetime.timedelta(seconds=self.timeout_s), wait_for_workers=False)
        backend = "cpu:gloo,cuda:nccl" if "cuda" in devices else "gloo"
        return {"host": self.link_host, "port": int(store.port), "world": world, "backend": backend}, store

    def _join(self, group: tuple[dict, Any]) -> None:
        """Join the world as rank 0 in a thread while the stages join theirs (init blocks until all have)."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                join_group(dict(group[0], rank=0), self.link_host, "cpu", self.timeout_s, store=group[1])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

        t = threading.Thread(target=run, name="vramancer-dist-init", daemon=True)
        t.start()
        self._group = True
        self._group_thread, self._group_errors = t, errors

    def _node(self, device_id: str):
        name = node_of(device_id)
        try:
            return self.view.node(name)
        except KeyError:
            raise BadInputError(f"the plan puts a stage on {device_id}: no node {name!r} in the cluster") from None

    def _get(self, refs: list[Any]) -> list[Any]:
        import ray

        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            last = (str(cause).splitlines() or [type(cause).__name__])[-1][:400]
            err = VramancerError(f"a stage worker failed: {last}")
            # our own errors keep their exit code (bad input 2, out of memory 3); anything else is 1
            err.exit_code = cause.exit_code if isinstance(cause, VramancerError) else 1
            raise err from None
        except ray.exceptions.GetTimeoutError:
            raise VramancerError(f"the stage workers did not answer in {self.timeout_s:.0f} s") from None

    def _start_bridge(self, fps: list[str]) -> dict:
        """The cloud bridge: the driver's checkpoint served over Link TLS to the stage nodes."""
        from ..hub.bridge import checkpoint_bridge
        from ..link.errors import LinkError
        from ..link.tls import TlsTransport

        server = checkpoint_bridge(self.folder)
        tr = TlsTransport(self.identity, cluster_trust(fps))
        self._bridge = tr.listen((self.link_host, 0))

        def serve() -> None:
            while not self._closed:
                try:
                    conn = self._bridge.accept(timeout=None)
                except LinkError:
                    if self._closed:
                        return
                    continue
                t = threading.Thread(target=_serve_quietly, args=(server, conn), daemon=True)
                t.start()
                self._bridge_threads.append(t)

        threading.Thread(target=serve, name="vramancer-bridge", daemon=True).start()
        host, port = self._bridge.address[:2]
        return {"host": host, "port": int(port), "fingerprint": self.identity.fingerprint}

    # -- running ----------------------------------------------------------------------------------
    def forward(self, ids: list[int], start: int) -> Any:
        """Logits [1, V] (float32) of the last of ``ids``, which sit at positions start.. of the sequence."""
        import torch

        from ..link.frame import FrameType, torch_buffers

        ctrl = torch.tensor([OP_FORWARD, start], dtype=torch.int64)
        self.first.send([ctrl, torch.tensor([ids], dtype=torch.int64)])
        f = self.last.recv(factory=torch_buffers)
        if f.frame_type != FrameType.TENSORS or len(f.tensors) != 2:
            raise VramancerError(f"the pipeline stopped: {self._stage_errors() or 'the last stage closed its link'}")
        return f.tensors[1].float().cpu()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] | None = None,
                 sampler: Any = None) -> list[int]:
        """The new token ids (at most ``max_new_tokens``; stops after an EOS id): greedy, or each drawn by
        ``sampler.sample(logits [V])`` (runtime/sampling.py's Sampler: temperature, top-p, its own seeded generator)."""
        if not prompt_ids:
            raise BadInputError("an empty prompt")
        ctx = self.plan.workload.context
        if len(prompt_ids) + max_new_tokens > ctx:
            raise BadInputError(f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens is more than the "
                                f"{ctx} tokens of context the plan holds (plan with a larger --context)")
        out: list[int] = []
        t0 = time.perf_counter()
        chunk = max(1, self.plan.workload.prefill_chunk)   # the activations the plan sized each stage for
        for s in range(0, len(prompt_ids), chunk):
            logits = self.forward(list(prompt_ids[s:s + chunk]), s)
        self.timing.prefill_s += time.perf_counter() - t0
        pos = len(prompt_ids)
        t1 = time.perf_counter()
        while True:
            tok = int(logits[0].argmax()) if sampler is None else sampler.sample(logits[0])
            out.append(tok)
            if len(out) >= max_new_tokens or (eos_ids and tok in eos_ids):
                break
            logits = self.forward([tok], pos)
            pos += 1
        self.timing.decode_s += time.perf_counter() - t1
        self.timing.tokens += len(out)
        return out

    def _stage_errors(self) -> str:
        try:
            errs = [json.loads(s)["error"] for s in self._get([a.stats.remote() for a in self.actors])]
        except VramancerError:
            return ""
        return "; ".join(f"stage {i}: {e}" for i, e in enumerate(errs) if e)

    def stats(self) -> PipelineStats:
        """Driver figures and each stage's own (wait / compute / send seconds, bytes on its links)."""
        rows = [json.loads(s) for s in self._get([a.stats.remote() for a in self.actors])]
        stages = []
        for i, (st, r) in enumerate(zip(self.plan.stages, rows)):
            stages.append(StageTiming(i, node_of(st.device), st.device, r["forwards"], r["wait_s"], r["compute_s"],
                                      r["send_s"], r["load_s"], r["loaded_from"], r["bytes_received"],
                                      r["bytes_sent"], r["bridge"], r["transport_in"], r["transport_out"]))
        return PipelineStats(self.timing.tokens, self.timing.prefill_s, self.timing.decode_s, stages)

    def close(self) -> None:
        import ray

        from ..link.frame import FrameType

        if self._closed:
            return
        self._closed = True

        if self.first is not None:
            try:
                self.first.send_control(FrameType.CLOSE)
            except VramancerError:
                pass
        if self.last is not None and self.transports[-1] == "torch":
            self._drain(self.last)    # the last stage's CLOSE: a gloo send waits for its receive
        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=15)
            except Exception:  # noqa: BLE001 - the actor is killed next whatever happened
                pass
            ray.kill(a)
        self.actors = []
        for c in (self.first, self.last, self._bridge):
            if c is not None:
                c.close()
        _remove_folder(self._folder)
        if self._group:
            import torch.distributed as dist

            if not self._group_thread.is_alive() and dist.is_initialized():
                dist.destroy_process_group()
            self._group = False

    @staticmethod
    def _drain(conn: Any, timeout_s: float = 10.0) -> None:
        """Receive what the last stage still sends (its CLOSE) for up to ``timeout_s``."""
        from ..link.frame import FrameType

        def run() -> None:
            try:
                while conn.recv().frame_type == FrameType.TENSORS:
                    pass
            except Exception:  # noqa: BLE001 - a link already broken has nothing left to drain
                pass

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout_s)

    def __enter__(self) -> ClusterPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _serve_quietly(server: Any, conn: Any) -> None:
    from ..link.errors import LinkError

    try:
        server.serve(conn)
    except LinkError as e:
        log.warning("cloud bridge: %s", e)
