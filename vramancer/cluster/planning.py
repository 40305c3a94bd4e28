"""Plan over every device of every node of a cluster.

Devices are the nodes' own (``NodeInfo.devices``) under cluster ids ``node2/cuda:0``. A hop between
two nodes costs what the Link measured (``discover``): half a round trip plus the hidden state's
bytes over the measured bandwidth, per decode step (one token) and per prefill chunk; a hop inside
a node costs what the planner's cost model says (``CostModel.hop_seconds``). The driver (the node
running ``plan`` / ``run``) sends token ids to the first stage and gets the last position's logits
back, so a first or last stage elsewhere costs those hops too.

The search keeps each node's devices together in the pipeline order, so activations cross the
network at most once per node boundary; it tries node orders (every one for up to
``MAX_NODE_ORDERS`` permutations, the driver's node first otherwise), partitions the blocks over
each order with the planner's own partitioner (``plan.partition``: memory, offload tiers), prices
each result with the measured hops, and keeps the cheapest (fewest blocks off the GPUs first, then
seconds per token). The Plan is then assembled by the planner (``plan_placement``) and its predicted
speeds include the network.

Each hop of the pipeline (driver -> stage 0, stage i -> stage i+1, last stage -> driver) gets its
transport from where its two ends live and what they compute on (``hop_transport``), recorded in
``Plan.hops`` with the reason and its price per decode step. ``trusted`` is ``--trusted-network``;
``link`` is ``--link auto|tls|tcp|torch``, the transport of the hops between nodes:

    same node, default         shm: shared memory between the two worker processes (link/shm.py),
                               priced with a local figure (``SHM_LATENCY_S``, ``SHM_BANDWIDTH_BYTES_PER_S``)
    same node, trusted, both   torch: torch.distributed with NCCL (P2P / NVLink between the two GPUs,
    ends CUDA on two GPUs,     no copy through host memory), priced with ``NCCL_LOCAL_*`` (--link
    torch has NCCL             is about hops between nodes: it does not change this one)
    different nodes, default   tls: mutual TLS 1.3 pinned to the peer node's key, priced with the link
    (or --link tls)            the agents measured (they measure over TLS: that figure is TLS's)
    different nodes, trusted   tcp for host tensors (link auto or tcp); torch when both ends are CUDA
                               devices and torch has NCCL (link auto; GPUDirect RDMA is NCCL's own
                               choice where the NICs allow it), or whenever --link torch (gloo
                               for host tensors). Priced as the measured link without TLS's crypto
                               (``plaintext_hop_seconds``)

Plaintext (tcp, torch) is never chosen without ``--trusted-network``, and a plan file whose hops
say tcp or torch is refused at run time without it (``check_hops``). torch within one node needs the
flag as well, although its bytes never leave the machine: torch.distributed's rendezvous store and
its gloo / NCCL bootstrap sockets listen on the node's network address without authentication, so
the flag is what says that address is on a network the user trusts. Without it, two GPUs of one node
talk over shm (a copy through host memory, which costs the PCIe transfers the cost model prices).
Two Ray nodes on one machine count as different nodes (they may not share ``/dev/shm``: containers).
Whether torch has NCCL is asked of the driver's torch (the stages' nodes are assumed to match).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import replace
from typing import Any

from ..devices.device import Device
from ..errors import BadInputError, DoesNotFitError, WorkloadError
from ..plan.plan import Hop
from .nodes import ClusterView, node_of

__all__ = ["cluster_devices", "network_hop_seconds", "plan_cluster", "MAX_NODE_ORDERS", "network_summary",
           "hop_transport", "shm_hop_seconds", "plan_hops", "hops_summary", "SHM_LATENCY_S",
           "SHM_BANDWIDTH_BYTES_PER_S", "LINKS", "PLAINTEXT", "check_link", "check_hops", "hop_seconds",
           "plaintext_hop_seconds", "TLS_CRYPTO_BYTES_PER_S", "NCCL_LOCAL_LATENCY_S",
           "NCCL_LOCAL_BANDWIDTH_BYTES_PER_S", "nccl_available", "pipeline_ends"]

MAX_NODE_ORDERS = 24
_DEFAULT_RTT_S = 1e-3           # a node pair the probes could not measure: a LAN's figures
_DEFAULT_BANDWIDTH = 117e6      # 1 GbE
# shared memory between two processes of one host: a control message over a Unix socket each way
# (frame, ack) and two copies (into the segment, out of it) at a conservative memcpy speed
SHM_LATENCY_S = 30e-6
SHM_BANDWIDTH_BYTES_PER_S = 4e9
_CTRL_BYTES = 16                # the (op, start) int64 pair every pipeline frame carries
# TLS 1.3's AES-GCM on one core (OpenSSL with AES-NI, 16 KiB records: 2-4 GB/s; the lower end): each
# byte is encrypted by the sender and decrypted by the receiver, one after the other on a pipeline's
# hop, so plaintext saves 2 / TLS_CRYPTO_BYTES_PER_S seconds per byte of what the TLS-measured link costs
TLS_CRYPTO_BYTES_PER_S = 2e9
# NCCL between two GPUs of one machine (P2P over PCIe 4.0 x16, conservative; NVLink is faster)
NCCL_LOCAL_LATENCY_S = 15e-6
NCCL_LOCAL_BANDWIDTH_BYTES_PER_S = 12e9
LINKS = ("auto", "tls", "tcp", "torch")   # --link: the transport of the hops between nodes
PLAINTEXT = ("tcp", "torch")                # what only --trusted-network allows


@functools.lru_cache(maxsize=1)
def nccl_available() -> bool:
    """Whether this process's torch has NCCL (False without torch); asked once per process (the planner
    prices every hop of every candidate)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return bool(dist.is_available() and dist.is_nccl_available())


def check_link(link: str, trusted: bool) -> None:
    """--link and --trusted-network together: a plaintext link without the flag is bad input."""
    if link not in LINKS:
        raise BadInputError(f"--link must be one of {', '.join(LINKS)}, not {link!r}")
    if link in PLAINTEXT and not trusted:
        raise BadInputError(f"--link {link} is plaintext between nodes: add --trusted-network "
                            "(only on a network you trust), or use --link tls")


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def hop_transport(src_node: str, dst_node: str, *, trusted: bool = False, link: str = "auto",
                  src_device: str = "", dst_device: str = "", nccl: bool | None = None) -> tuple[str, str]:
    """(transport, reason) of a hop from a process on node ``src_node`` to one on ``dst_node``
    ("" when unknown); ``src_device`` / ``dst_device``: the torch devices the ends compute on ("" or
    "cpu": host tensors, as the driver's). See the module docstring for the rule."""
    check_link(link, trusted)
    both_cuda = _cuda(src_device) and _cuda(dst_device)
    if src_node and src_node == dst_node:
        if trusted and both_cuda and src_device != dst_device \
                and (nccl_available() if nccl is None else nccl):
            return "torch", (f"both ends on {src_node}, {src_device} -> {dst_device}, --trusted-network: "
                             "torch.distributed NCCL between the two GPUs (P2P, no host copy)")
        return "shm", f"both ends on {src_node}: shared memory between the two processes"
    if not trusted or link == "tls":
        if not src_node or not dst_node:
            return "tls", "one end's node is unknown: TLS pinned to the peer's key"
        return "tls", f"{src_node} -> {dst_node} are different nodes: TLS pinned to {dst_node}'s key"
    where = f"{src_node or '?'} -> {dst_node or '?'} are different nodes, --trusted-network"
    has_nccl = nccl_available() if nccl is None else nccl
    if link == "torch" or (link == "auto" and both_cuda and has_nccl):
        if both_cuda and has_nccl:
            return "torch", (f"{where}: torch.distributed NCCL between {src_device} and {dst_device} "
                             "(GPUDirect RDMA where NCCL finds it: NCCL's own choice)")
        return "torch", f"{where}, --link torch: torch.distributed gloo (host tensors, plaintext TCP)"
    return "tcp", f"{where}: plaintext TCP (host tensors; no TLS crypto per byte)"


def check_hops(hops: list[Any], trusted: bool) -> None:
    """A plan whose hops go plaintext (tcp, torch) runs only with --trusted-network: one line, exit 2."""
    plain = [f"{h.src} -> {h.dst} {h.transport}" for h in hops if h.transport in PLAINTEXT]
    if plain and not trusted:
        raise BadInputError(f"the plan's hops go plaintext ({', '.join(plain)}): run with --trusted-network "
                            "(only on a network you trust), or plan again without it")


def shm_hop_seconds(nbytes: int) -> float:
    """Seconds for ``nbytes`` over shared memory between two processes of one host (local figure)."""
    return SHM_LATENCY_S + nbytes / SHM_BANDWIDTH_BYTES_PER_S


def plaintext_hop_seconds(view: ClusterView, a: str, b: str, nbytes: int) -> float:
    """Seconds for ``nbytes`` from node ``a`` to ``b`` in plaintext (tcp, gloo): the link was measured
    over TLS, so TLS's crypto (``2 / TLS_CRYPTO_BYTES_PER_S`` a byte) comes off its per-byte time, never
    below shared memory's."""
    if a == b or not a or not b:
        return 0.0
    rtt, bw = _measure(view, a, b)
    per_byte = max(1 / bw - 2 / TLS_CRYPTO_BYTES_PER_S, 1 / SHM_BANDWIDTH_BYTES_PER_S)
    return rtt / 2 + nbytes * per_byte


def hop_seconds(view: ClusterView, transport: str, a: str, b: str, nbytes: int) -> float:
    """Seconds of one hop of ``nbytes`` from node ``a`` to ``b`` over ``transport``."""
    if transport == "shm":
        return shm_hop_seconds(nbytes)
    if transport == "tls":
        return network_hop_seconds(view, a, b, nbytes)
    if a and a == b:      # torch within one node: NCCL between its GPUs
        return NCCL_LOCAL_LATENCY_S + nbytes / NCCL_LOCAL_BANDWIDTH_BYTES_PER_S
    return plaintext_hop_seconds(view, a, b, nbytes)


def cluster_devices(view: ClusterView) -> list[Device]:
    """Every device of every node, with cluster ids (``node2/cuda:0``), nodes in order."""
    out = []
    for n in view.nodes:
        for d in n.devices:
            out.append(replace(d, id=f"{n.name}/{d.id}"))
    return out


def _measure(view: ClusterView, a: str, b: str) -> tuple[float, float]:
    lk = view.link(a, b) or view.link(b, a)
    if lk is None:
        return _DEFAULT_RTT_S, _DEFAULT_BANDWIDTH
    return lk.rtt_s, lk.bandwidth_bytes_per_s


def network_hop_seconds(view: ClusterView, a: str, b: str, nbytes: int) -> float:
    """Seconds for ``nbytes`` to go one way from node ``a`` to node ``b``: half the measured round
    trip plus the bytes over the measured bandwidth (0 within a node)."""
    if a == b or not a or not b:
        return 0.0
    rtt, bw = _measure(view, a, b)
    return rtt / 2 + nbytes / bw


class _Pricing:
    def __init__(self, profile: Any, devices: list[Device], workload: Any, view: ClusterView, driver: str,
                 trusted: bool = False, link: str = "auto") -> None:
        from ..plan.cost import CostModel
        from ..plan.memory import BlockTable

        self.profile = profile
        self.devices = devices
        self.view = view
        self.driver = driver
        self.trusted = trusted
        self.link = link
        self.cost = CostModel(profile, workload.context, workload.batch, workload.prefill_chunk)
        self.table = BlockTable(profile, workload.context, workload.batch, workload.prefill_chunk)
        self.batch = workload.batch
        self.chunk_tokens = self.table.chunk_tokens
        dt_bytes = 2 if "16" in str(workload.dtype) else 4
        self.token_bytes = (profile.hidden_size or 4096) * dt_bytes
        self.logits_bytes = int(getattr(profile, "vocab_size", 0) or 32000) * 4
        self.seconds = [[self.cost.execute_seconds(b, d)[0] for b in profile.blocks] for d in devices]
        self.prefill = [[self.cost.execute_seconds(b, d)[1] for b in profile.blocks] for d in devices]

    def hop(self, a: int, b: int) -> tuple[float, float]:
        """(decode, prefill) seconds of the hidden state from a stage on device a to one on device b."""
        da, db = self.devices[a], self.devices[b]
        na, nb = node_of(da.id), node_of(db.id)
        if na != nb:
            return (self.link_seconds(na, nb, self.batch * self.token_bytes, da.torch_device, db.torch_device),
                    self.link_seconds(na, nb, self.chunk_tokens * self.token_bytes, da.torch_device, db.torch_device))
        return self.cost.hop_seconds(da, db)

    def link_seconds(self, a: str, b: str, nbytes: int, dev_a: str = "", dev_b: str = "") -> float:
        """Seconds of one hop between processes on nodes a and b (computing on torch devices dev_a,
        dev_b; "" for the driver's host end) over the transport it gets."""
        transport = hop_transport(a, b, trusted=self.trusted, link=self.link, src_device=dev_a, dst_device=dev_b)[0]
        return hop_seconds(self.view, transport, a, b, nbytes)

    def network(self, ranges: list[tuple[int, int, int]]) -> tuple[float, float, int]:
        """(decode, prefill) seconds of a placement's hops between processes (shm within a node, the
        network between nodes), and its node boundaries crossed."""
        dec = pre = 0.0
        crossings = 0
        nodes = [node_of(self.devices[d].id) for d, _, _ in ranges]
        devs = [self.devices[d].torch_device for d, _, _ in ranges]
        for x, y, dx, dy in zip(nodes, nodes[1:], devs, devs[1:]):
            crossings += x != y
            dec += self.link_seconds(x, y, self.batch * self.token_bytes, dx, dy)
            pre += self.link_seconds(x, y, self.chunk_tokens * self.token_bytes, dx, dy)
        if nodes and self.driver:
            ids = self.link_seconds(self.driver, nodes[0], 8 * self.batch, "", devs[0])
            logits = self.link_seconds(nodes[-1], self.driver, self.logits_bytes * self.batch, devs[-1], "")
            dec += ids + logits
            pre += ids + logits
            crossings += (nodes[0] != self.driver) + (nodes[-1] != self.driver)
        return dec, pre, crossings

    def total(self, ranges: list[tuple[int, int, int]]) -> float:
        t = sum(sum(self.seconds[d][s:e]) for d, s, e in ranges)
        for (a, _, _), (b, _, _) in zip(ranges, ranges[1:]):
            if node_of(self.devices[a].id) == node_of(self.devices[b].id) and a != b:
                t += self.cost.hop_seconds(self.devices[a], self.devices[b])[0]
        return t + self.network(ranges)[0]


def _node_orders(nodes: list[str], driver: str) -> list[list[str]]:
    perms = itertools.permutations(nodes)
    orders = [list(p) for p in itertools.islice(perms, MAX_NODE_ORDERS)]
    if driver in nodes:   # beyond the limit, the orders starting on the driver's node come first
        first = [o for o in orders if o[0] == driver]
        orders = first + [o for o in orders if o[0] != driver]
    return orders


def _within_node(devices: list[Device], idx: list[int]) -> list[int]:
    from ..plan.partition import candidate_orders

    sub = [devices[i] for i in idx]
    return [idx[j] for j in candidate_orders(sub, 1)[0]]


def plan_cluster(model: Any, view: ClusterView, *, context: int | None = None, batch: int = 1,
                 dtype: str | None = None, objective: str = "latency", reserve_bytes: int | str | None = None,
                 prefill_chunk: int = 512, driver: str = "", trusted_network: bool = False,
                 link: str = "auto") -> Any:
    """The Plan of ``model`` over every device of ``view``'s nodes (see the module docstring).
    ``driver``: the node the driver runs on (its hops to the first and from the last stage count).
    ``trusted_network`` (--trusted-network) and ``link`` (--link): the hops' transports (``hop_transport``)."""
    from ..models.profile import ModelProfile
    from ..models.resolve import profile as make_profile
    from ..plan.memory import default_reserve_bytes
    from ..plan.partition import partition, time_quantum
    from ..plan.plan import Workload
    from ..plan.planner import check_reserve, check_workload, default_context, plan_placement

    check_workload(1 if context is None else context, batch, objective, prefill_chunk)
    check_link(link, trusted_network)
    prof = model if isinstance(model, ModelProfile) else make_profile(model, dtype=dtype)
    devices = cluster_devices(view)
    if not devices:
        raise WorkloadError("the cluster's nodes report no devices (see `vramancer cluster status`)")
    if context is None:
        context = default_context(prof)
    workload = Workload(context=context, batch=batch, dtype=prof.dtype, objective=objective,  # type: ignore[arg-type]
                        prefill_chunk=prefill_chunk)
    check_workload(context, batch, objective, prefill_chunk)
    r = None if reserve_bytes is None else check_reserve(reserve_bytes)
    reserve = [r if (r is not None and d.kind == "gpu") else default_reserve_bytes(d) for d in devices]
    capacity = [max(0, d.free_bytes - res) for d, res in zip(devices, reserve)]
    pricing = _Pricing(prof, devices, workload, view, driver, trusted_network, link)
    quantum = time_quantum(pricing.seconds)
    by_node: dict[str, list[int]] = {}
    for i, d in enumerate(devices):
        by_node.setdefault(node_of(d.id), []).append(i)
    best: tuple[Any, list[tuple[int, int, int]]] | None = None
    for node_order in _node_orders(list(by_node), driver):
        order: list[int] = []
        hops: list[float] = [0.0] * len(devices)
        prev_node = None
        for name in node_order:
            idx = _within_node(devices, by_node[name])
            for k, i in enumerate(idx):
                if k == 0 and prev_node is not None:
                    hops[i] = pricing.hop(order[-1], i)[0]
                else:
                    hops[i] = pricing.cost.hop_seconds(devices[order[-1]] if order else devices[i], devices[i])[0]
                order.append(i)
            prev_node = name
        p = partition(pricing.table, devices, order, capacity, pricing.seconds, hops, objective, quantum=quantum)
        if p is None:
            continue
        key = (p.cost[0], pricing.total(p.ranges))
        if best is None or key < best[0]:
            best = (key, p.ranges)
    if best is None:
        need = sum(pricing.table.weights) + sum(pricing.table.kv)
        short = max(need - sum(capacity), 1)

        raise DoesNotFitError(f"{prof.name} does not fit on the cluster's {len(devices)} devices "
                              f"({', '.join(d.id for d in devices)}) at context {context}",
                              shortfall_bytes=short)
    ranges = best[1]
    block_devices = [devices[d].id for d, s, e in ranges for _ in range(s, e)]
    plan = plan_placement(prof, devices, workload, block_devices, reserve_bytes=reserve_bytes)
    net_dec, net_pre, crossings = pricing.network(ranges)
    p = plan.predicted
    step_s = p.decode_ms_per_step / 1000 + net_dec
    if objective == "throughput" and len(plan.stages) > 1:
        decode_tps = batch / max(batch / max(p.decode_tokens_per_s, 1e-9), net_dec)
    else:
        decode_tps = batch / step_s if step_s > 0 else p.decode_tokens_per_s
    pre_s = pricing.chunk_tokens / max(p.prefill_tokens_per_s, 1e-9) + net_pre
    plan.predicted = replace(p, decode_tokens_per_s=round(decode_tps, 3),
                             prefill_tokens_per_s=round(pricing.chunk_tokens / pre_s, 3),
                             decode_ms_per_step=round(step_s * 1000, 3))
    plan.notes.append(network_summary(view, plan, driver, net_dec, crossings))
    plan.hops = plan_hops(plan, view, driver, pricing.token_bytes * batch, pricing.logits_bytes * batch,
                          trusted=trusted_network, link=link)
    plan.notes.append(hops_summary(plan.hops))
    return plan


def pipeline_ends(plan: Any, driver: str) -> list[tuple[str, str, str]]:
    """(name, node, torch device) of the pipeline's ends in order: the driver (host tensors), each
    stage, the driver again."""
    stages = [(f"stage {i}", node_of(st.device), st.torch_device) for i, st in enumerate(plan.stages)]
    return [("driver", driver, "")] + stages + [("driver", driver, "")]


def plan_hops(plan: Any, view: ClusterView, driver: str, hidden_bytes: int, logits_bytes: int, *,
              trusted: bool = False, link: str = "auto") -> list[Hop]:
    """The hops of ``plan``'s pipeline: driver -> stage 0, each stage -> the next, the last -> driver,
    each with its transport (``hop_transport``), the bytes crossing it per decode step (the control
    pair, then token ids / ``hidden_bytes`` / ``logits_bytes``) and their seconds."""
    ends = pipeline_ends(plan, driver)
    out = []
    n = len(plan.stages)
    for k, ((src, a, da), (dst, b, db)) in enumerate(zip(ends, ends[1:])):
        payload = 8 if k == 0 else (logits_bytes if k == n else hidden_bytes)
        nbytes = _CTRL_BYTES + payload
        transport, why = hop_transport(a, b, trusted=trusted, link=link, src_device=da, dst_device=db)
        secs = hop_seconds(view, transport, a, b, nbytes)
        out.append(Hop(src, dst, a, b, transport, why, nbytes, round(secs, 9)))
    return out


def hops_summary(hops: list[Hop]) -> str:
    """One note line: each hop's transport and its milliseconds per decode step."""
    parts = [f"{h.src} -> {h.dst} {h.transport} {h.decode_seconds * 1000:.3f} ms" for h in hops]
    return "cluster hops: " + ", ".join(parts)


def network_summary(view: ClusterView, plan: Any, driver: str, net_dec: float, crossings: int) -> str:
    nodes = []
    for st in plan.stages:
        n = node_of(st.device)
        if not nodes or nodes[-1] != n:
            nodes.append(n)
    path = " -> ".join(([f"driver({driver})"] if driver else []) + nodes + ([f"driver({driver})"] if driver else []))
    return (f"cluster: {path}; the network is crossed {crossings} times per token, "
            f"{net_dec * 1000:.2f} ms of each decode step on its hops (measured links; shm: a local figure)")
