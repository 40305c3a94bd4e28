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
revoked is refused). The driver's own node is the Ray node its process runs on.

Per token the driver sends ``[ctrl, token ids]`` to the first stage; each stage runs its blocks and
sends ``[ctrl, hidden states]`` on; the last stage sends ``[ctrl, logits of the last position]``
back, and the driver picks the token (greedy). ``ctrl`` is an int64 vector (op, start): op 1 runs a
forward whose inputs start at token ``start`` of the sequence (0: a new sequence, caches reset).
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

__all__ = ["StageWorker", "ClusterPipeline", "StageTiming", "PipelineStats", "OP_FORWARD", "shm_slot_bytes"]

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


def _listen(kind: str, host: str, identity: Any, slot_bytes: int) -> tuple[Any, Any, str]:
    """(transport, listener, private folder or "") of a hop's listening end."""
    from ..link.shm import ShmTransport
    from ..link.tls import TlsTransport

    if kind == "shm":
        import tempfile

        folder = tempfile.mkdtemp(prefix="vramancer-hop-")     # 0700: only this user reaches the socket
        tr: Any = ShmTransport(slot_bytes=slot_bytes)
        return tr, tr.listen(str(Path(folder) / "s")), folder
    tr = TlsTransport(identity, cluster_trust([]))
    return tr, tr.listen((host, 0)), ""


def _endpoint(kind: str, listener: Any) -> dict:
    if kind == "shm":
        return {"transport": "shm", "path": listener.address}
    return {"transport": "tls", "host": listener.address[0], "port": int(listener.address[1])}


def _dial(end: dict, identity: Any, fingerprint: str, slot_bytes: int) -> Any:
    """Connect to a hop's listening end described by ``end`` (``_endpoint``)."""
    from ..link.shm import ShmTransport
    from ..link.tls import TlsTransport

    if end["transport"] == "shm":
        return ShmTransport(slot_bytes=slot_bytes).connect(end["path"])
    return TlsTransport(identity, cluster_trust([fingerprint])).connect((end["host"], int(end["port"])))


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
    transport_in: str = ""      # the hop from the previous stage (or the driver): shm or tls
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
        listen (the previous hop's transport: tls or shm), slot_bytes (shm).
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
        if kind not in ("tls", "shm"):
            raise BadInputError(f"stage {index}: unknown hop transport {kind!r}")
        self.slot_bytes = int(spec.get("slot_bytes") or (1 << 20))
        self.transport, self.listener, self.folder = _listen(kind, spec["host"], self.identity, self.slot_bytes)
        self.hops["in"] = kind
        self.timing = {"load_s": time.perf_counter() - t0, "loaded_from": loaded_from, "forwards": 0,
                       "wait_s": 0.0, "compute_s": 0.0, "send_s": 0.0}
        return json.dumps({**_endpoint(kind, self.listener), "fingerprint": self.identity.fingerprint,
                           **self.timing})

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
            while True:
                t0 = time.perf_counter()
                f = self.prev.recv(factory=torch_buffers)
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
    ``link_host``: where the driver's Link endpoints bind (default: this node's address in Ray)."""

    def __init__(self, plan: Any, view: ClusterView, folder: str | Path, *, bridge: bool = True,
                 local_copies: bool = True, link_host: str | None = None, cache_dir: str | None = None,
                 timeout_s: float = 300.0) -> None:
        import ray

        from ..link.keys import load_identity
        from ..models.checkpoint import read_config
        from .planning import hop_transport
        from .stage import stage_tensor_names

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
        try:
            nodes = [self._node(st.device) for st in plan.stages]
            for n in nodes:
                if not n.fingerprint:
                    raise BadInputError(f"{n.name} has no Link identity: run `vramancer keys init` there")
            fps = [n.fingerprint for n in nodes]
            _refuse_revoked(nodes)      # shm hops check no key: a node this one revoked gets no stage at all
            here = ray.get_runtime_context().get_node_id()
            self.driver_node = next((n.name for n in view.nodes if n.ray_id == here), "")
            ends_nodes = [self.driver_node] + [n.name for n in nodes] + [self.driver_node]
            # hop k: from ends_nodes[k] to ends_nodes[k + 1] (driver -> stage 0, ..., last stage -> driver)
            self.transports = [hop_transport(a, b)[0] for a, b in zip(ends_nodes, ends_nodes[1:])]
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
                    "listen": self.transports[i], "slot_bytes": slot}))
            ends = [json.loads(r) for r in self._get([a.setup.remote(s) for a, s in zip(self.actors, specs)])]
            self.loads = ends
            for e, n in zip(ends, nodes):
                if e["fingerprint"] != n.fingerprint:
                    raise BadInputError(f"{n.name}: the stage's key {e['fingerprint']} is not the node's "
                                        f"{n.fingerprint}")
            # the driver's ends: it dials stage 0, the last stage dials the driver's listener
            back = self.transports[-1]
            self._in, listener, self._folder = _listen(back, self.link_host, self.identity, slot)
            if back == "tls":
                self._in.trust = cluster_trust([fps[-1]])
            try:
                wires = []
                for i, a in enumerate(self.actors):
                    prev_fp = self.identity.fingerprint if i == 0 else fps[i - 1]
                    if i + 1 < len(self.actors):
                        nxt, nfp = ends[i + 1], fps[i + 1]
                    else:
                        nxt, nfp = _endpoint(back, listener), self.identity.fingerprint
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
        return f.tensors[1]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] | None = None) -> list[int]:
        """Greedy decoding: the new token ids (at most ``max_new_tokens``; stops after an EOS id)."""
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
            tok = int(logits[0].argmax())
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

        if self._closed:
            return
        self._closed = True
        from ..link.frame import FrameType

        if self.first is not None:
            try:
                self.first.send_control(FrameType.CLOSE)
            except VramancerError:
                pass
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
