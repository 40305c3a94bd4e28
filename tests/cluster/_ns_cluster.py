"""The cluster tests' driver, run inside the tests' network namespace (``ip netns exec NS python -m
tests.cluster._ns_cluster ROOT MODEL``): a Ray cluster of three nodes (``ray.cluster_utils``, token
auth), each with its own Link identity (its own config folder under ROOT) and device spec; then
discovery, greedy over 2 nodes (stages over the cloud bridge) and 3 nodes (local copies), 3 stages
over 2 nodes (two stages on one node: shared memory between them), a node key revoked on the
driver, and with --trusted-network: 2 nodes over plaintext tcp, 2 nodes with --link torch (gloo),
sampling with a seed, and a plaintext plan refused without the flag. One JSON object on the last
line of stdout; no pickle crosses a process boundary. The tests compare it with the same split run
in their own process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["PROMPT", "NEW_TOKENS", "NODE_DEVICES", "TWO_NODE_DEVICES", "SHARED_NODE_DEVICES", "SAMPLING", "main"]

PROMPT = [1, 5, 9, 17, 33, 4, 60]
NEW_TOKENS = 12
# three simulated GPUs of 200 KiB: the tiny model (conftest.make_tiny_model; about 361 KiB at context 64
# with one layer's activations) needs all three; two of 300 KiB hold it, one does not
NODE_DEVICES = ["gpu1:200KiB@100GBps@1TFLOPS", "gpu2:200KiB@100GBps@1TFLOPS", "gpu3:200KiB@100GBps@1TFLOPS"]
TWO_NODE_DEVICES = ["gpu1:300KiB@100GBps@1TFLOPS", "gpu2:300KiB@100GBps@1TFLOPS"]
# the three 200 KiB devices over two nodes: three stages, two of them on node1
SHARED_NODE_DEVICES = ["gpu1:200KiB@100GBps@1TFLOPS,gpu2:200KiB@100GBps@1TFLOPS", "gpu3:200KiB@100GBps@1TFLOPS"]


def _start(root: Path):
    from vramancer.cluster.local import start_local_cluster

    return start_local_cluster(root, NODE_DEVICES, {"OMP_NUM_THREADS": "1"})


def _greedy(view, folder: Path, cache: Path, n_nodes: int) -> dict:
    """Over 2 nodes every stage comes from the driver over the cloud bridge (as to nodes without a
    copy of the checkpoint); over 3 nodes each stage reads the node's local copy."""
    from dataclasses import replace

    from vramancer.cluster.nodes import ClusterView
    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import plan_cluster
    from vramancer.devices.spec import parse_devices

    nodes = view.nodes
    if n_nodes == 2:   # two larger devices: the model fits on two nodes, not on one
        nodes = [replace(n, devices=parse_devices(spec)) for n, spec in zip(nodes, TWO_NODE_DEVICES)]
    sub = ClusterView(view.address, nodes[:n_nodes], view.links)
    plan = plan_cluster(str(folder), sub, context=64, reserve_bytes=0, driver="node1")
    bridge = n_nodes == 2
    with ClusterPipeline(plan, sub, folder, local_copies=not bridge, cache_dir=str(cache / f"n{n_nodes}")) as pipe:
        got = pipe.generate(PROMPT, NEW_TOKENS)
        stats = pipe.stats()
    return {"plan": plan.to_json(indent=None), "tokens": got, "stages": [s.__dict__ for s in stats.stages]}


def _shared_node(view, folder: Path) -> dict:
    """Three stages over two nodes, two on node1: the hop between those is shm, the others as planned."""
    import tempfile
    from dataclasses import replace

    from vramancer.cluster.nodes import ClusterView
    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import plan_cluster
    from vramancer.devices.spec import parse_devices

    def hop_folders() -> set[str]:
        return {str(f) for f in Path(tempfile.gettempdir()).glob("vramancer-hop-*")}

    nodes = [replace(n, devices=parse_devices(spec)) for n, spec in zip(view.nodes, SHARED_NODE_DEVICES)]
    sub = ClusterView(view.address, nodes, view.links)
    plan = plan_cluster(str(folder), sub, context=64, reserve_bytes=0, driver="node1")
    before = hop_folders()
    with ClusterPipeline(plan, sub, folder) as pipe:
        during = hop_folders() - before
        got = pipe.generate(PROMPT, NEW_TOKENS)
        stats = pipe.stats()
        transports = list(pipe.transports)
    return {"plan": plan.to_json(indent=None), "tokens": got, "stages": [s.__dict__ for s in stats.stages],
            "transports": transports, "hop_folders_open": len(during),
            "hop_folders_left": sorted(hop_folders() - before)}


SAMPLING = {"temperature": 0.9, "top_p": 0.9, "seed": 1234}


def _two_nodes(view):
    from dataclasses import replace

    from vramancer.cluster.nodes import ClusterView
    from vramancer.devices.spec import parse_devices

    nodes = [replace(n, devices=parse_devices(spec)) for n, spec in zip(view.nodes, TWO_NODE_DEVICES)]
    return ClusterView(view.address, nodes, view.links)


def _trusted(view, folder: Path, link: str, sample: bool = False) -> dict:
    """2 nodes with --trusted-network and ``link``: the hops the plan records, the ones the workers
    ran, the tokens (greedy, or sampled with SAMPLING)."""
    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import plan_cluster
    from vramancer.runtime.sampling import Sampler, SamplingParams

    sub = _two_nodes(view)
    plan = plan_cluster(str(folder), sub, context=64, reserve_bytes=0, driver="node1", trusted_network=True, link=link)
    sampler = Sampler(SamplingParams(**SAMPLING)) if sample else None
    with ClusterPipeline(plan, sub, folder, trusted_network=True, link=link) as pipe:
        got = pipe.generate(PROMPT, NEW_TOKENS, sampler=sampler)
        stats = pipe.stats()
        transports = list(pipe.transports)
    import torch.distributed as dist

    return {"plan": plan.to_json(indent=None), "tokens": got, "stages": [s.__dict__ for s in stats.stages],
            "transports": transports, "dist_left": dist.is_initialized()}


def _plaintext_refused(view, folder: Path) -> dict:
    """A plan made with --trusted-network (tcp hops) run without it: refused before any worker starts."""
    import ray

    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import plan_cluster

    sub = _two_nodes(view)
    plan = plan_cluster(str(folder), sub, context=64, reserve_bytes=0, driver="node1", trusted_network=True)
    before = {a for a, s in ray._private.state.actors().items() if s["State"] == "ALIVE"}
    error = {"type": "", "message": "", "exit_code": 0}
    try:
        ClusterPipeline(plan, sub, folder).close()
    except Exception as e:  # noqa: BLE001 - reported to the test, which checks the kind
        error = {"type": type(e).__name__, "message": str(e), "exit_code": getattr(e, "exit_code", 0)}
    after = {a for a, s in ray._private.state.actors().items() if s["State"] == "ALIVE"}
    return {"error": error, "new_alive_actors": sorted(after - before)}


def _revoked(view, folder: Path) -> dict:
    """The driver revoked node1's key: its connection to the first stage is refused; which actors live after."""
    from dataclasses import replace

    import ray

    from vramancer.cluster.nodes import ClusterView
    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import plan_cluster
    from vramancer.devices.spec import parse_devices
    from vramancer.link.keys import TrustStore

    node = replace(view.nodes[0], devices=parse_devices("gpu1:1MiB@100GBps@1TFLOPS"))
    sub = ClusterView(view.address, [node], [])
    plan = plan_cluster(str(folder), sub, context=64, reserve_bytes=0, driver="node1")
    store = TrustStore.load()
    store.revoke(node.fingerprint)
    store.save()

    def alive() -> set[str]:
        return {a for a, s in ray._private.state.actors().items() if s["State"] == "ALIVE"}

    before = alive()
    error = {"type": "", "message": ""}
    try:
        ClusterPipeline(plan, sub, folder).close()
    except Exception as e:  # noqa: BLE001 - reported to the test, which checks the kind
        error = {"type": type(e).__name__, "message": str(e)}
    finally:
        store.path.unlink()
    return {"fingerprint": node.fingerprint, "error": error, "new_alive_actors": sorted(alive() - before)}


def main(argv: list[str]) -> int:
    import ray

    root, folder = Path(argv[0]), Path(argv[1])
    cluster = _start(root)
    try:
        from vramancer.cluster.nodes import discover

        view = discover(cluster.address, probe_bytes=1 << 20)
        out = {"address": cluster.address, "ray_node_ip": ray.util.get_node_ip_address(),
               "view": view.to_dict(),
               "greedy": {str(n): _greedy(view, folder, root / "cache", n) for n in (2, 3)},
               "shared_node": _shared_node(view, folder),
               "tcp": _trusted(view, folder, "auto"),
               "torch": _trusted(view, folder, "torch"),
               "sampled": _trusted(view, folder, "auto", sample=True),
               "plaintext_refused": _plaintext_refused(view, folder),
               "revoked": _revoked(view, folder)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
