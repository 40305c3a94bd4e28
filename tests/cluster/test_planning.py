"""Cluster planning without Ray: nodes stay contiguous in the pipeline, network hops are priced
as measured, and the prediction includes them."""
from __future__ import annotations

import pytest

from vramancer.cluster.nodes import ClusterView, LinkMeasure, NodeInfo, node_of
from vramancer.cluster.planning import cluster_devices, network_hop_seconds, plan_cluster
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
                    f"per token, {note[0].split(', ')[1].split(' ms')[0]} ms of each decode step (measured links)"]
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
