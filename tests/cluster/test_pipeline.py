"""Greedy output of a model split over 2 and 3 Ray nodes (stages as Ray actors, hidden states over
Link TLS on loopback) equals the same split run in one process; the planner groups stages by node."""
from __future__ import annotations

import pytest

from .conftest import RAY_MISSING, TWO_NODE_DEVICES

ray = pytest.importorskip("ray", reason=RAY_MISSING)
torch = pytest.importorskip("torch")

PROMPT = [1, 5, 9, 17, 33, 4, 60]
NEW_TOKENS = 12


def single_process_tokens(folder, plan) -> list[int]:
    """The same plan loaded in this process (vramancer.load) and decoded greedily."""
    from transformers import DynamicCache

    from vramancer.runtime.loader import load

    model = load(str(folder), plan=plan)
    try:
        cache = DynamicCache(config=model.config)
        x = torch.tensor([PROMPT])
        out = []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                logits = model(x, past_key_values=cache, use_cache=True).logits
                tok = int(logits[0, -1].argmax())
                out.append(tok)
                x = torch.tensor([[tok]])
        return out
    finally:
        model.vramancer.free()


@pytest.fixture(scope="module")
def view(ray_cluster):
    from vramancer.cluster.nodes import discover

    return discover(ray_cluster[1], probe_bytes=1 << 20)


def test_discover_reports_every_node(view, ray_cluster):
    from vramancer.link.keys import load_identity

    assert [n.name for n in view.nodes] == ["node1", "node2", "node3"]
    fps = {load_identity(c / "keys").fingerprint for c in ray_cluster[2]}
    assert {n.fingerprint for n in view.nodes} == fps
    devs = [[d.id for d in n.devices] for n in view.nodes]
    assert devs[0] == ["gpu1#0"] and view.nodes[0].is_head     # the head is node1; the others by address, id
    assert sorted(devs[1:]) == [["gpu2#0"], ["gpu3#0"]]
    assert len(view.links) == 6
    assert all(lk.rtt_s > 0 and lk.bandwidth_bytes_per_s > 0 and lk.probe_bytes == 1 << 20 for lk in view.links)


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_greedy_over_nodes_equals_one_process(view, tiny_folder, tmp_path, n_nodes):
    """Over 2 nodes every stage comes from the driver over the cloud bridge (as to nodes without a copy of
    the checkpoint): exactly its tensors' bytes; over 3 nodes each stage reads the node's local copy."""
    from dataclasses import replace

    from vramancer.cluster.nodes import ClusterView, node_of
    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import plan_cluster
    from vramancer.cluster.stage import stage_tensor_names
    from vramancer.devices.spec import parse_devices
    from vramancer.hub.bridge import checkpoint_tensors

    nodes = view.nodes
    if n_nodes == 2:   # two larger devices: the model fits on two nodes, not on one
        nodes = [replace(n, devices=parse_devices(spec)) for n, spec in zip(nodes, TWO_NODE_DEVICES)]
    sub = ClusterView(view.address, nodes[:n_nodes], view.links)
    plan = plan_cluster(str(tiny_folder), sub, context=64, reserve_bytes=0, driver="node1")
    assert len({node_of(s.device) for s in plan.stages}) == n_nodes
    bridge = n_nodes == 2
    with ClusterPipeline(plan, sub, tiny_folder, local_copies=not bridge, cache_dir=str(tmp_path / "cache")) as pipe:
        got = pipe.generate(PROMPT, NEW_TOKENS)
        stats = pipe.stats()
    assert got == single_process_tokens(tiny_folder, plan)
    assert [s.forwards for s in stats.stages] == [NEW_TOKENS] * len(plan.stages)
    if bridge:
        headers = checkpoint_tensors(tiny_folder)
        want = [sum(headers[n].nbytes for n in stage_tensor_names(tiny_folder, plan, i))
                for i in range(len(plan.stages))]
        assert all(s.loaded_from.startswith("cloud bridge") for s in stats.stages)
        assert [s.bridge["bytes"] for s in stats.stages] == want
        # identical tensors (the norms' ones) travel once per fetch
        assert all(0 < s.bridge["network_bytes"] <= w for s, w in zip(stats.stages, want))
    else:
        assert all(s.loaded_from == f"local copy {tiny_folder}" for s in stats.stages)


def test_a_node_key_revoked_on_the_driver_is_refused(view, tiny_folder, ray_cluster):
    """The driver revoked node1's key: its connection to the first stage is refused (TLS, pinned), in
    one error naming the key, and the stage actors it started are gone."""
    from dataclasses import replace

    from vramancer.cluster.nodes import ClusterView
    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import plan_cluster
    from vramancer.devices.spec import parse_devices
    from vramancer.link.errors import PeerRefusedError
    from vramancer.link.keys import TrustStore

    node = replace(view.nodes[0], devices=parse_devices("gpu1:1MiB@100GBps@1TFLOPS"))
    sub = ClusterView(view.address, [node], [])
    plan = plan_cluster(str(tiny_folder), sub, context=64, reserve_bytes=0, driver="node1")
    store = TrustStore.load()
    store.revoke(node.fingerprint)
    store.save()
    before = {a for a, s in ray._private.state.actors().items() if s["State"] == "ALIVE"}
    try:
        with pytest.raises(PeerRefusedError, match=f"refused revoked peer {node.fingerprint}"):
            ClusterPipeline(plan, sub, tiny_folder)
    finally:
        store.path.unlink()
    alive = {a for a, s in ray._private.state.actors().items() if s["State"] == "ALIVE"}
    assert alive <= before
