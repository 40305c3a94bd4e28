"""A Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``), each with its own
Link identity (its own config folder, so its own keys) and its own device spec, all on this machine's address.
Started once per test module and shut down after it; the driver has an identity of its own."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

RAY_MISSING = "the cluster tests need Ray (pip install 'vramancer[cluster]')"

# three simulated GPUs of 200 KiB: the tiny model (tiny_folder; about 361 KiB at context 64 with one
# layer's activations) needs all three; two of 300 KiB hold it, one does not
NODE_DEVICES = ["gpu1:200KiB@100GBps@1TFLOPS", "gpu2:200KiB@100GBps@1TFLOPS", "gpu3:200KiB@100GBps@1TFLOPS"]
TWO_NODE_DEVICES = ["gpu1:300KiB@100GBps@1TFLOPS", "gpu2:300KiB@100GBps@1TFLOPS"]


def make_identity(root: Path) -> str:
    from vramancer.link.keys import create_identity

    return create_identity(root / "keys").fingerprint


def make_tiny_model(folder: Path) -> Path:
    """A Llama with 6 layers (8 blocks) saved in ``folder``, random weights spread wide enough for
    decisive greedy picks."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cluster-model") / "llama")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """(cluster, address, node config folders): three nodes with token auth, driver connected."""
    ray = pytest.importorskip("ray", reason=RAY_MISSING)
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("ray-nodes")
    token = secrets.token_urlsafe(32)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                            "VRAMANCER_CONFIG")}
    from vramancer.cluster.control import use_token

    use_token(token)
    driver_cfg = root / "driver"
    make_identity(driver_cfg)
    os.environ["VRAMANCER_CONFIG"] = str(driver_cfg / "config.toml")
    nodes = []
    for i in range(len(NODE_DEVICES)):
        cfg = root / f"node{i + 1}"
        make_identity(cfg)
        nodes.append(cfg)
    env = [{"VRAMANCER_CONFIG": str(c / "config.toml"), "VRAMANCER_NODE_DEVICES": s,
            "OMP_NUM_THREADS": "1"} for c, s in zip(nodes, NODE_DEVICES)]
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False,
                                      "env_vars": env[0]})
    try:
        for e in env[1:]:
            cluster.add_node(num_cpus=1, env_vars=e)
        cluster.wait_for_nodes()
        from vramancer.cluster.control import connect, write_token

        token_file = root / "token"
        write_token(token_file, token)
        connect(cluster.address, token_file=token_file)
        yield cluster, cluster.address, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
