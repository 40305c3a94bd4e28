"""A Ray cluster of several nodes on this one machine (``ray.cluster_utils.Cluster``), each node
with its own Link identity and device spec, token auth on, this process connected as its driver:
what the cluster benchmark and the cluster tests run the stage workers on.

    cluster = start_local_cluster(Path(tmp), ["cpu", "cpu"])    # node1, node2; ``root/token``
    ...
    cluster.shutdown()
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["start_local_cluster"]


def start_local_cluster(root: Path, node_devices: list[str], node_env: dict[str, str] | None = None) -> Any:
    """Nodes ``node1..N`` (``VRAMANCER_NODE_DEVICES`` from ``node_devices``, one CPU each for Ray,
    config and keys under ``root/nodeI``), the driver's identity under ``root/driver`` (this process's
    ``VRAMANCER_CONFIG``), a fresh token in ``root/token``; returns the Cluster, connected."""
    from ray.cluster_utils import Cluster

    from ..link.keys import create_identity
    from .control import connect, use_token, write_token

    token = secrets.token_urlsafe(32)
    use_token(token)
    create_identity(root / "driver" / "keys")
    os.environ["VRAMANCER_CONFIG"] = str(root / "driver" / "config.toml")
    env = []
    for i, spec in enumerate(node_devices):
        node = root / f"node{i + 1}"
        create_identity(node / "keys")
        env.append({"VRAMANCER_CONFIG": str(node / "config.toml"), "VRAMANCER_NODE_DEVICES": spec,
                    **(node_env or {})})
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": env[0]})
    for e in env[1:]:
        cluster.add_node(num_cpus=1, env_vars=e)
    cluster.wait_for_nodes()
    write_token(root / "token", token)
    connect(cluster.address, token_file=root / "token")
    return cluster
