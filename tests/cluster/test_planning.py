"""Cluster planning without Ray: nodes stay contiguous in the pipeline, network hops are priced
as measured, and the prediction includes them."""
from __future__ import annotations

import pytest

from vramancer.cluster.nodes import ClusterView, LinkMeasure, NodeInfo, node_of
from vramancer.cluster.planning import (
    SHM_BANDWIDTH_BYTES_PER_S,
    SHM_LATENCY_S,
    cluster_devices,
    hop_transport,
    network_hop_seconds,
    plan_cluster,
)
from vramancer.devices.spec import parse_devices


def _view(specs: dict[str, str], rtt_s: float = 1e-3, bw: float = 117e6) -> ClusterView:
    nodes = [NodeInfo(name, f"id{name}", f"10.0.0.{i + 1}", i == 0, name, None, f"10.0.0.{i + 1}", 0,
                      parse_devices(spec)) for i, (name, spec) in enumerate(specs.items())]
    links = [LinkMeasure(a.name, b.name, rtt_s, bw, 1 << 20) for a in nodes for b in nodes if a is not b]
    return ClusterView("10.0.0.1:6379", nodes, links)


def _node_runs(plan) -> list[str]:
    runs: list[str] = []
    for st in plan.stages:
        n = node_of(st.device)
        if not runs or runs[-1] != n:
            runs.append(n)
    return runs


def test_devices_carry_their_node():
    view = _view({"node1": "rtx3060,cpu:8GiB", "node2": "rtx3090"})
    assert [d.id for d in cluster_devices(view)] == ["node1/rtx3060-12gb#0", "node1/cpu", "node2/rtx3090#0"]


def test_network_hop_is_half_rtt_plus_bytes_over_bandwidth():
    view = _view({"node1": "rtx3060", "node2": "rtx3060"}, rtt_s=2e-3, bw=1e9)
    assert network_hop_seconds(view, "node1", "node2", 8192) == pytest.approx(1e-3 + 8192 / 1e9)
    assert network_hop_seconds(view, "node1", "node1", 8192) == 0.0


def test_each_node_is_entered_once_and_the_network_costs_show():
    # two 12 GiB GPUs on each of two nodes: an 8B model in bf16 needs three GPUs; the planner's
    # interleaving of identical GPUs would cross the network back and forth, the cluster plan once
    view = _view({"node1": "rtx3060,rtx3060", "node2": "rtx3060,rtx3060"})
    plan = plan_cluster("llama-3.1-8b", view, context=4096, driver="node1")
    # ends on the driver's node: the logits (128256 x 4 bytes) then stay there; only token ids cross
    assert _node_runs(plan) == ["node2", "node1"]
    assert plan.fits
    note = [n for n in plan.notes if n.startswith("cluster:")]
    assert note == [f"cluster: driver(node1) -> node2 -> node1 -> driver(node1); the network is crossed 2 times "
                    f"per token, {note[0].split(', ')[1].split(' ms')[0]} ms of each decode step on its hops "
                    f"(measured links; shm: a local figure)"]
    # the same cluster on a 100x slower network predicts fewer tokens/s
    slow = plan_cluster("llama-3.1-8b", _view({"node1": "rtx3060,rtx3060", "node2": "rtx3060,rtx3060"},
                                              rtt_s=0.1, bw=1.17e6), context=4096, driver="node1")
    assert slow.predicted.decode_tokens_per_s < plan.predicted.decode_tokens_per_s


def test_a_model_that_fits_one_node_stays_there():
    view = _view({"node1": "rtx3090", "node2": "rtx3090"})
    plan = plan_cluster("llama-3.2-1b", view, context=4096, driver="node2")
    assert _node_runs(plan) == ["node2"]     # the driver's node: no network hop at all


def test_nothing_fits_is_exit_3():
    from vramancer.errors import DoesNotFitError

    with pytest.raises(DoesNotFitError) as e:
        plan_cluster("llama-3.1-70b", _view({"node1": "rtx3060", "node2": "rtx3060"}), context=4096)
    assert e.value.exit_code == 3


def test_each_hop_gets_its_transport_priced_and_recorded():
    """Two stages on one node: shm between them (a local figure), TLS across nodes (the measured link);
    the driver's hop on its own node is shm too. The hops survive the plan's JSON; a plan without
    them (one machine, or an older cluster plan) reads back with none."""
    from vramancer.errors import BadInputError
    from vramancer.plan.plan import Plan

    view = _view({"node1": "rtx3060,rtx3060", "node2": "rtx3060,rtx3060"}, rtt_s=1e-3, bw=117e6)
    plan = plan_cluster("llama-3.1-8b", view, context=4096, driver="node1")
    nodes = [node_of(s.device) for s in plan.stages]
    assert nodes == ["node2", "node2", "node1"]
    ends = ["node1", *nodes, "node1"]
    assert [(h.src, h.dst) for h in plan.hops] == [("driver", "stage 0"), ("stage 0", "stage 1"),
                                                  ("stage 1", "stage 2"), ("stage 2", "driver")]
    assert [(h.src_node, h.dst_node) for h in plan.hops] == list(zip(ends, ends[1:]))
    assert [h.transport for h in plan.hops] == ["tls", "shm", "tls", "shm"]
    hidden = 16 + 4096 * 2                      # the control pair + one bf16 hidden state
    logits = 16 + 128256 * 4
    assert [h.bytes_per_token for h in plan.hops] == [16 + 8, hidden, hidden, logits]
    secs = [1e-3 / 2 + 24 / 117e6, SHM_LATENCY_S + hidden / SHM_BANDWIDTH_BYTES_PER_S,
            1e-3 / 2 + hidden / 117e6, SHM_LATENCY_S + logits / SHM_BANDWIDTH_BYTES_PER_S]
    assert [h.decode_seconds for h in plan.hops] == pytest.approx(secs, rel=1e-6)
    assert "TLS pinned to node2's key" in plan.hops[0].reason and "shared memory" in plan.hops[1].reason
    assert any(n.startswith("cluster hops: driver -> stage 0 tls 0.500 ms, stage 0 -> stage 1 shm")
               for n in plan.notes)
    again = Plan.from_json(plan.to_json())
    assert again.hops == plan.hops
    d = plan.to_dict()
    del d["hops"]
    assert Plan.from_dict(d).hops == []
    d["hops"] = [dict(plan.hops[0].to_dict(), transport="udp")]
    with pytest.raises(BadInputError, match="transport"):
        Plan.from_dict(d)


def test_hop_transport_rule():
    assert hop_transport("node1", "node1")[0] == "shm"
    assert hop_transport("node1", "node2")[0] == "tls"
    assert hop_transport("", "node2")[0] == "tls"      # an unknown end never gets shm
    assert hop_transport("", "")[0] == "tls"


def test_trusted_network_rule():
    """Without --trusted-network nothing goes plaintext; with it, tcp for host tensors between nodes and
    torch (NCCL) between CUDA ends where torch has NCCL; --link forces the transport between nodes."""
    from vramancer.errors import BadInputError

    cuda = {"src_device": "cuda:0", "dst_device": "cuda:1"}
    assert hop_transport("node1", "node2", **cuda, nccl=True)[0] == "tls"            # not trusted: TLS
    assert hop_transport("node1", "node1", **cuda, nccl=True)[0] == "shm"
    assert hop_transport("node1", "node2", trusted=True)[0] == "tcp"
    assert hop_transport("node1", "node2", trusted=True, **cuda, nccl=False)[0] == "tcp"
    t, why = hop_transport("node1", "node2", trusted=True, **cuda, nccl=True)
    assert t == "torch" and "NCCL" in why and "GPUDirect RDMA" in why
    assert hop_transport("node1", "node2", trusted=True, link="tls", **cuda, nccl=True)[0] == "tls"
    assert hop_transport("node1", "node2", trusted=True, link="tcp", **cuda, nccl=True)[0] == "tcp"
    t, why = hop_transport("node1", "node2", trusted=True, link="torch")
    assert t == "torch" and "gloo" in why
    # within one node: torch only for two GPUs, trusted, with NCCL; host ends stay on shm
    t, why = hop_transport("node1", "node1", trusted=True, **cuda, nccl=True)
    assert t == "torch" and "P2P" in why
    assert hop_transport("node1", "node1", trusted=True, link="torch")[0] == "shm"
    same_gpu = {"src_device": "cuda:0", "dst_device": "cuda:0"}
    assert hop_transport("node1", "node1", trusted=True, **same_gpu, nccl=True)[0] == "shm"
    assert hop_transport("node1", "node1", trusted=True, **cuda, nccl=False)[0] == "shm"
    # --link is about the hops between nodes: a hop within one node keeps its own rule
    assert hop_transport("node1", "node1", trusted=True, link="tls", **cuda, nccl=True)[0] == "torch"
    for link in ("tcp", "torch"):
        with pytest.raises(BadInputError, match="--trusted-network"):
            hop_transport("node1", "node2", link=link)
    with pytest.raises(BadInputError, match="--link must be one of"):
        hop_transport("node1", "node2", link="udp")


def _cuda_view(specs: dict[str, str], **kw) -> ClusterView:
    from dataclasses import replace

    view = _view(specs, **kw)
    for n in view.nodes:
        n.devices = [replace(d, torch_device=f"cuda:{i}") for i, d in enumerate(n.devices)]
    return view


def test_trusted_plan_prices_plaintext_below_tls(monkeypatch):
    """The same split, planned with and without --trusted-network on CUDA nodes whose torch has NCCL:
    the hops between two CUDA stages become torch (NCCL), the driver's host-tensor hops tcp, each
    priced without TLS's crypto; the trusted plan's step is faster by exactly that."""
    from vramancer.cluster import planning

    monkeypatch.setattr(planning, "nccl_available", lambda: True)
    specs = {"node1": "rtx3060,rtx3060", "node2": "rtx3060,rtx3060"}
    tls = plan_cluster("llama-3.1-8b", _cuda_view(specs), context=4096, driver="node1")
    plain = plan_cluster("llama-3.1-8b", _cuda_view(specs), context=4096, driver="node1", trusted_network=True)
    assert [s.device for s in plain.stages] == [s.device for s in tls.stages]
    nodes = [node_of(s.device) for s in plain.stages]
    assert nodes == ["node2", "node2", "node1"]
    assert [h.transport for h in tls.hops] == ["tls", "shm", "tls", "shm"]
    assert [h.transport for h in plain.hops] == ["tcp", "torch", "torch", "shm"]
    per_byte = 1 / 117e6 - 2 / planning.TLS_CRYPTO_BYTES_PER_S
    assert plain.hops[0].decode_seconds == pytest.approx(1e-3 / 2 + 24 * per_byte, rel=1e-6)
    hid = plain.hops[1].bytes_per_token
    assert plain.hops[1].decode_seconds == pytest.approx(
        planning.NCCL_LOCAL_LATENCY_S + hid / planning.NCCL_LOCAL_BANDWIDTH_BYTES_PER_S, rel=1e-6)
    assert plain.hops[2].decode_seconds == pytest.approx(1e-3 / 2 + hid * per_byte, rel=1e-6)
    assert plain.hops[2].decode_seconds < tls.hops[2].decode_seconds
    assert plain.predicted.decode_tokens_per_s > tls.predicted.decode_tokens_per_s
    # --link tls with the flag: TLS between nodes, the same price as without the flag
    forced = plan_cluster("llama-3.1-8b", _cuda_view(specs), context=4096, driver="node1", trusted_network=True,
                          link="tls")
    assert [h.transport for h in forced.hops] == ["tls", "torch", "tls", "shm"]
    assert forced.hops[0].decode_seconds == tls.hops[0].decode_seconds


def test_a_plaintext_plan_needs_the_flag_to_run():
    from vramancer.cluster.planning import check_hops
    from vramancer.errors import BadInputError

    view = _view({"node1": "rtx3060,rtx3060", "node2": "rtx3060,rtx3060"})
    plan = plan_cluster("llama-3.1-8b", view, context=4096, driver="node1", trusted_network=True)
    assert [h.transport for h in plan.hops] == ["tcp", "shm", "tcp", "shm"]
    check_hops(plan.hops, True)
    with pytest.raises(BadInputError, match=r"plaintext \(driver -> stage 0 tcp, stage 1 -> stage 2 tcp\)") as e:
        check_hops(plan.hops, False)
    assert e.value.exit_code == 2
    check_hops(plan_cluster("llama-3.1-8b", view, context=4096, driver="node1").hops, False)   # TLS: runs
