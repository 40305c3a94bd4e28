"""Greedy output of a model split over 2 and 3 Ray nodes (stages as Ray actors, hidden states over
Link TLS) equals the same split run in one process; a node key revoked on the driver is refused.
With --trusted-network the hops between nodes are plaintext tcp, or torch.distributed (gloo) with
--link torch, and still equal; sampling with a seed equals one process sampling with the same seed;
a plan whose hops are plaintext is refused without the flag.

The cluster, its stage workers and its driver live in a network namespace the test creates
(_netns.py; Ray needs a non-loopback address and nothing here binds outside the namespace): one run
of _ns_cluster.py does the cluster's work and prints JSON; the single-process side runs here."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from ._netns import REPO
from ._ns_cluster import NEW_TOKENS, PROMPT, SAMPLING
from .conftest import RAY_MISSING

pytest.importorskip("ray", reason=RAY_MISSING)
torch = pytest.importorskip("torch")


def single_process_tokens(folder, plan, sampler=None, prompt=PROMPT, new_tokens=NEW_TOKENS) -> list[int]:
    """The same plan loaded in this process (vramancer.load) and decoded greedily, or each token drawn
    by ``sampler`` (serve's Sampler, as the cluster's driver draws them)."""
    from transformers import DynamicCache

    from vramancer.runtime.loader import load

    model = load(str(folder), plan=plan)
    try:
        cache = DynamicCache(config=model.config)
        x = torch.tensor([list(prompt)])
        out = []
        with torch.no_grad():
            for _ in range(new_tokens):
                logits = model(x, past_key_values=cache, use_cache=True).logits
                tok = int(logits[0, -1].argmax()) if sampler is None else sampler.sample(logits[0, -1].float())
                out.append(tok)
                x = torch.tensor([[tok]])
        return out
    finally:
        model.vramancer.free()


@pytest.fixture(scope="module")
def run(cluster_ns, tiny_folder, tmp_path_factory):
    """The cluster's results (one run of _ns_cluster.py inside the namespace) and the node config folders."""
    root = tmp_path_factory.mktemp("ray-nodes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run(cluster_ns.python("-m", "tests.cluster._ns_cluster", str(root), str(tiny_folder)), cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), root


def test_everything_binds_the_namespace_address(run, cluster_ns):
    out, _ = run
    assert out["ray_node_ip"] == cluster_ns.address and out["address"].startswith(cluster_ns.address + ":")
    assert {n["address"] for n in out["view"]["nodes"]} == {cluster_ns.address}
    assert {n["link_host"] for n in out["view"]["nodes"]} == {cluster_ns.address}


def test_discover_reports_every_node(run):
    from vramancer.link.keys import load_identity

    out, root = run
    nodes = out["view"]["nodes"]
    assert [n["name"] for n in nodes] == ["node1", "node2", "node3"]
    fps = {load_identity(root / f"node{i}" / "keys").fingerprint for i in (1, 2, 3)}
    assert {n["fingerprint"] for n in nodes} == fps
    assert all(d["id"].startswith(n["name"] + "/") for n in nodes for d in n["devices"])
    devs = [[d["id"].split("/", 1)[1] for d in n["devices"]] for n in nodes]
    assert devs[0] == ["gpu1#0"] and nodes[0]["is_head"]   # the head is node1; the others by address, Ray id
    assert sorted(devs[1:]) == [["gpu2#0"], ["gpu3#0"]]
    links = out["view"]["links"]
    assert len(links) == 6
    assert all(lk["rtt_s"] > 0 and lk["bandwidth_bytes_per_s"] > 0 and lk["probe_bytes"] == 1 << 20 for lk in links)


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_greedy_over_nodes_equals_one_process(run, tiny_folder, n_nodes):
    """Over 2 nodes every stage came from the driver over the cloud bridge (as to nodes without a copy
    of the checkpoint): exactly its tensors' bytes; over 3 nodes each stage read the node's local copy."""
    from vramancer.cluster.nodes import node_of
    from vramancer.cluster.stage import stage_tensor_names
    from vramancer.hub.bridge import checkpoint_tensors
    from vramancer.plan.plan import Plan

    res = run[0]["greedy"][str(n_nodes)]
    plan = Plan.from_json(res["plan"])
    assert len({node_of(s.device) for s in plan.stages}) == n_nodes
    assert res["tokens"] == single_process_tokens(tiny_folder, plan)
    stages = res["stages"]
    assert [s["forwards"] for s in stages] == [NEW_TOKENS] * len(plan.stages)
    if n_nodes == 2:
        headers = checkpoint_tensors(tiny_folder)
        want = [sum(headers[n].nbytes for n in stage_tensor_names(tiny_folder, plan, i))
                for i in range(len(plan.stages))]
        assert all(s["loaded_from"].startswith("cloud bridge") for s in stages)
        assert [s["bridge"]["bytes"] for s in stages] == want
        # identical tensors (the norms' ones) travel once per fetch
        assert all(0 < s["bridge"]["network_bytes"] <= w for s, w in zip(stages, want))
    else:
        assert all(s["loaded_from"] == f"local copy {tiny_folder}" for s in stages)


def test_two_stages_on_one_node_talk_over_shared_memory(run, tiny_folder):
    """Three stages over two nodes, two of them on one node: the plan prices and records shm for that
    hop (and for the driver's hop on its own node), TLS for the hops between nodes; the workers use
    exactly those transports, every hidden state crosses them, and greedy output equals one process."""
    from vramancer.cluster.nodes import node_of
    from vramancer.plan.plan import Plan

    res = run[0]["shared_node"]
    plan = Plan.from_json(res["plan"])
    nodes = [node_of(s.device) for s in plan.stages]
    assert len(nodes) == 3 and sorted(nodes) == ["node1", "node1", "node2"]
    ends = ["node1"] + nodes + ["node1"]                  # the driver runs on node1
    want = ["shm" if a == b else "tls" for a, b in zip(ends, ends[1:])]
    assert [h.transport for h in plan.hops] == want
    assert [(h.src_node, h.dst_node) for h in plan.hops] == list(zip(ends, ends[1:]))
    assert [h.src for h in plan.hops] == ["driver", "stage 0", "stage 1", "stage 2"]
    between_stages = want[1:-1]
    assert sorted(between_stages) == ["shm", "tls"]     # one hop inside node1, one across
    assert res["transports"] == want
    stages = res["stages"]
    assert [s["transport_in"] for s in stages] == want[:-1]
    assert [s["transport_out"] for s in stages] == want[1:]
    # each stage received what the previous one sent, over whichever transport
    assert [s["bytes_received"] for s in stages[1:]] == [s["bytes_sent"] for s in stages[:-1]]
    assert all(s["bytes_sent"] > 0 for s in stages)
    assert [s["forwards"] for s in stages] == [NEW_TOKENS] * 3
    assert res["tokens"] == single_process_tokens(tiny_folder, plan)
    # one private socket folder per shm listener while running (two here), none left after close
    assert res["hop_folders_open"] == want.count("shm")
    assert res["hop_folders_left"] == []


def test_a_node_key_revoked_on_the_driver_is_refused(run):
    """The driver revoked node1's key: its connection to the first stage is refused (TLS, pinned), in
    one error naming the key, and the stage actors it started are gone."""
    rv = run[0]["revoked"]
    assert rv["error"]["type"] == "PeerRefusedError"
    assert f"refused revoked peer {rv['fingerprint']}" in rv["error"]["message"]
    assert rv["new_alive_actors"] == []


def _cross_node(plan) -> list[bool]:
    return [h.src_node != h.dst_node for h in plan.hops]


@pytest.mark.parametrize("scenario, transport", [("tcp", "tcp"), ("torch", "torch")])
def test_trusted_network_hops_run_plaintext_and_equal_one_process(run, tiny_folder, scenario, transport):
    """--trusted-network: the hops between the two nodes are plaintext TCP (the rule's choice for host
    tensors) or, with --link torch, torch.distributed over gloo; within node1 shm as before. The plan
    records them, the workers ran exactly them, and greedy output equals one process. The plan prices the
    plaintext hops as the measured (TLS) link less TLS's crypto: less than the TLS plan of the same split."""
    from vramancer.cluster.nodes import node_of
    from vramancer.cluster.planning import SHM_BANDWIDTH_BYTES_PER_S, TLS_CRYPTO_BYTES_PER_S
    from vramancer.plan.plan import Plan

    out = run[0]
    res = out[scenario]
    plan = Plan.from_json(res["plan"])
    nodes = [node_of(s.device) for s in plan.stages]
    assert sorted(set(nodes)) == ["node1", "node2"]
    ends = ["node1", *nodes, "node1"]
    want = [transport if a != b else "shm" for a, b in zip(ends, ends[1:])]
    assert transport in want
    assert [h.transport for h in plan.hops] == want == res["transports"]
    assert [s["transport_in"] for s in res["stages"]] == want[:-1]
    assert [s["transport_out"] for s in res["stages"]] == want[1:]
    reason = "plaintext TCP" if transport == "tcp" else "--link torch: torch.distributed gloo"
    assert all(reason in h.reason and "--trusted-network" in h.reason
               for h, cross in zip(plan.hops, _cross_node(plan)) if cross)
    assert [s["forwards"] for s in res["stages"]] == [NEW_TOKENS] * len(plan.stages)
    assert all(s["bytes_sent"] > 0 and s["bytes_received"] > 0 for s in res["stages"])
    assert res["tokens"] == single_process_tokens(tiny_folder, plan)
    assert res["dist_left"] is False      # the driver's torch.distributed world is torn down with the pipeline
    # priced: the measured link (over TLS) less TLS's crypto per byte; the TLS plan of the same split costs more
    links = {(lk["src"], lk["dst"]): lk for lk in out["view"]["links"]}
    tls_plan = Plan.from_json(out["greedy"]["2"]["plan"])
    assert [s.device for s in tls_plan.stages] == [s.device for s in plan.stages]
    for h, t in zip(plan.hops, tls_plan.hops):
        if h.src_node == h.dst_node:
            assert h.decode_seconds == t.decode_seconds
            continue
        lk = links.get((h.src_node, h.dst_node)) or links[(h.dst_node, h.src_node)]
        per_byte = max(1 / lk["bandwidth_bytes_per_s"] - 2 / TLS_CRYPTO_BYTES_PER_S, 1 / SHM_BANDWIDTH_BYTES_PER_S)
        assert h.decode_seconds == pytest.approx(lk["rtt_s"] / 2 + h.bytes_per_token * per_byte, rel=1e-6, abs=1e-9)
        assert t.transport == "tls" and h.decode_seconds < t.decode_seconds


def test_sampling_with_a_seed_equals_one_process(run, tiny_folder):
    """run --cluster's sampling: serve's Sampler (temperature, top-p, its own generator seeded with the
    seed) draws from the last stage's logits; one process drawing from the same plan's logits with the
    same Sampler and seed draws the same tokens, and they are not the greedy ones."""
    from vramancer.plan.plan import Plan
    from vramancer.runtime.sampling import Sampler, SamplingParams

    res = run[0]["sampled"]
    plan = Plan.from_json(res["plan"])
    want = single_process_tokens(tiny_folder, plan, Sampler(SamplingParams(**SAMPLING)))
    assert res["tokens"] == want
    assert want != single_process_tokens(tiny_folder, plan)
    reseeded = Sampler(SamplingParams(**dict(SAMPLING, seed=SAMPLING["seed"] + 1)))
    other = single_process_tokens(tiny_folder, plan, reseeded)
    assert other != want


def test_a_plaintext_plan_is_refused_without_trusted_network(run):
    """A plan made with --trusted-network (tcp hops) run without it: one line naming the hops, exit 2,
    before any stage worker starts."""
    res = run[0]["plaintext_refused"]
    assert res["error"]["type"] == "BadInputError" and res["error"]["exit_code"] == 2
    assert res["error"]["message"].startswith("the plan's hops go plaintext (driver -> stage 0 tcp")
    assert "--trusted-network" in res["error"]["message"] and "\n" not in res["error"]["message"]
    assert res["new_alive_actors"] == []
