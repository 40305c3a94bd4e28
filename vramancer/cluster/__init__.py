"""Several machines: Ray for control (start, join, status, stop; actors pinned to nodes), the
VRAMancer Link for tensors (stage to stage over mutual TLS pinned to each node's key).

    control.py   `ray start` head / join with token auth, driver connection, stop what we started
    nodes.py     per-node agents: devices, Link identity, measured links (RTT, bandwidth)
    planning.py  a plan over every device of every node, network hops priced as measured
    stage.py     one stage's block range as a model of its own (local copy or cloud bridge)
    pipeline.py  stage workers (Ray actors) wired over the Link, and the driver's greedy decode
    commands.py  `vramancer cluster start | join | status | stop`, and `--cluster` for plan / run
    local.py     a cluster of several nodes on this one machine (benchmarks, tests)
"""
from __future__ import annotations

__all__: list[str] = []
