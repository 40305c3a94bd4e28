"""Decode tokens/s of a model split over 2 Ray nodes (stage workers, hidden states over the Link)
against the same split run in one process, measured side by side in one run, on this machine.

The cluster is two Ray nodes started here (``ray.cluster_utils.Cluster``, token auth), each with its
own Link identity; the model is a Llama of the given sizes with random weights, saved as
safetensors; the plan puts the first half of its blocks on node1's CPU and the rest on node2's
(``plan_placement``: the planner's own assembly). The anchor loads the same plan in this process
(``vramancer.load``) and decodes greedily with a KV cache; ours runs ``ClusterPipeline.generate``.
Each figure is the median over --repeat runs of --new-tokens tokens after a --prompt-tokens
prompt, taking turns (anchor, ours, anchor, ...) so that other load falls on both. Both must
produce the same tokens (checked every run).

Where the time goes, per decode token (ours): each stage's compute, and the rest of the step
(the Link hops driver -> node1 -> node2 -> driver, each over the transport the plan picked for it:
shared memory within a node, TLS between nodes; framing, the kernel's loopback, and the wake-ups of
the threads that wait on them).

``--links tls,tcp,torch`` runs one pipeline per link choice at once (``--link`` of ``run --cluster``;
tcp and torch with ``--trusted-network``: the hops between the nodes plaintext TCP, or
torch.distributed over gloo) and takes turns between all of them and the anchor in each round; the
first keeps the table above, each one gets a line (tokens/s, ratio to one process, the step's time
outside the stages' compute).

Where it binds: Ray refuses a loopback head (its drivers rewrite 127.0.0.1 to the machine's own
address), so the two nodes, the stage workers' Link endpoints and the driver bind the address Ray
finds for this machine (the source address of its default route) - the machine's own LAN address,
as a real two-machine cluster would. To keep it off every real interface, run it inside a network
namespace: its smoke test does (tests/benchmarks/test_cluster_smoke.py, tests/cluster/_netns.py:
``ip netns exec NS python benchmarks/cluster.py``, the namespace holding one private address and a
default route through it). Either way the hops stay on this machine (the kernel's local route).

Run:  python benchmarks/cluster.py [--layers 8 --hidden 512 --repeat 3] [--links tls,tcp,torch] [--json FILE]
A benchmark, not a test: it exits 0 and prints a table (no goal: the issue asks for the ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

__all__ = ["main", "build_model", "start_cluster"]


def build_model(folder: Path, layers: int, hidden: int, vocab: int) -> Path:
    from benchmarks.common import make_llama

    model = make_llama(hidden, layers, vocab, inter=hidden * 11 // 4, max_positions=4096)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def start_cluster(root: Path, nodes: int = 2):
    """A Ray cluster of ``nodes`` CPU nodes on this machine (vramancer.cluster.local), connected."""
    from vramancer.cluster.local import start_local_cluster

    return start_local_cluster(root, ["cpu"] * nodes)


def _anchor_run(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    x = torch.tensor([prompt])
    out = []
    t0 = 0.0
    with torch.no_grad():
        for i in range(new_tokens):
            if i == 1:
                t0 = time.perf_counter()
            tok = int(model(x, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--links", default="tls", help="comma-separated --link choices to compare: tls, tcp, torch "
                    "(tcp and torch run with --trusted-network; default tls)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    a.links = [x.strip() for x in a.links.split(",") if x.strip()]
    if not a.links or any(x not in ("tls", "tcp", "torch") for x in a.links) or len(set(a.links)) != len(a.links) \
            or a.links.count("torch") > 1:
        print("benchmarks/cluster.py: --links is a comma-separated list of distinct tls, tcp, torch", file=sys.stderr)
        return 2
    for name in ("layers", "hidden", "vocab", "prompt_tokens", "repeat"):
        if getattr(a, name) < 1:
            print(f"benchmarks/cluster.py: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if a.new_tokens < 2 or a.hidden % 64 and a.hidden >= 64:
        print("benchmarks/cluster.py: --new-tokens must be at least 2 and --hidden a multiple of 64",
              file=sys.stderr)
        return 2
    try:
        import ray
    except ImportError:
        print("benchmarks/cluster.py: needs Ray (pip install 'vramancer[cluster]')", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    saved_env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="vrm-bench-cluster-") as tmp:
        root = Path(tmp)
        folder = build_model(root / "model", a.layers, a.hidden, a.vocab)
        cluster = start_cluster(root)
        try:
            return _measure(a, folder)
        finally:
            ray.shutdown()
            cluster.shutdown()
            os.environ.clear()
            os.environ.update(saved_env)


def _measure(a: argparse.Namespace, folder: Path) -> int:
    from vramancer.cluster.nodes import discover
    from vramancer.cluster.pipeline import ClusterPipeline
    from vramancer.cluster.planning import cluster_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.plan import Workload
    from vramancer.plan.planner import plan_placement
    from vramancer.runtime.loader import load

    view = discover(probe_bytes=4 << 20)
    devices = cluster_devices(view)
    prof = profile(str(folder))
    n = prof.num_blocks
    block_devices = [devices[0].id] * (n // 2) + [devices[1].id] * (n - n // 2)
    context = a.prompt_tokens + a.new_tokens + 8
    plan = plan_placement(prof, devices, Workload(context=context, batch=1, dtype=prof.dtype), block_devices)
    prompt = [(7 * i + 3) % (a.vocab - 3) + 3 for i in range(a.prompt_tokens)]
    anchor_model = load(str(folder), plan=plan)
    anchor_tps: list[float] = []
    runs = {name: {"tps": [], "steps": [], "computes": []} for name in a.links}
    pipes: dict[str, Any] = {}
    try:
        for name in a.links:
            pipes[name] = ClusterPipeline(plan, view, folder, trusted_network=name != "tls", link=name)
        _anchor_run(anchor_model, prompt, 2)      # warm-up, all
        for pipe in pipes.values():
            pipe.generate(prompt, 2)
        for _ in range(a.repeat):
            ref, dt = _anchor_run(anchor_model, prompt, a.new_tokens)
            anchor_tps.append((a.new_tokens - 1) / dt)
            for name, pipe in pipes.items():
                before = pipe.stats()
                got = pipe.generate(prompt, a.new_tokens)
                after = pipe.stats()
                if got != ref:
                    print(f"benchmarks/cluster.py: the 2-node output (--link {name}) differs from one process: "
                          f"{got} vs {ref}", file=sys.stderr)
                    return 1
                dec = after.decode_s - before.decode_s
                r = runs[name]
                r["tps"].append((a.new_tokens - 1) / dec)
                fw = [x.forwards - y.forwards for x, y in zip(after.stages, before.stages)]
                r["computes"].append([(x.compute_s - y.compute_s) / f
                                      for x, y, f in zip(after.stages, before.stages, fw)])
                r["steps"].append(dec / (a.new_tokens - 1))
        stats = pipes[a.links[0]].stats()
        transports = {name: list(pipe.transports) for name, pipe in pipes.items()}
    finally:
        for pipe in pipes.values():
            pipe.close()
    anchor_model.vramancer.free()
    anchor = statistics.median(anchor_tps)
    by_link = {}
    for name, r in runs.items():
        st = statistics.median(r["steps"])
        cp = [statistics.median(c[i] for c in r["computes"]) for i in range(len(plan.stages))]
        tps = statistics.median(r["tps"])
        by_link[name] = {"tokens_per_s": tps, "ratio": tps / anchor, "step_ms": st * 1000,
                         "stage_compute_ms": [c * 1000 for c in cp], "link_and_wakeups_ms": (st - sum(cp)) * 1000,
                         "transports": transports[name]}
    first = runs[a.links[0]]
    ours = statistics.median(first["tps"])
    step = statistics.median(first["steps"])
    comp = [statistics.median(c[i] for c in first["computes"]) for i in range(len(plan.stages))]
    link = view.link("node1", "node2")
    rows = {
        "model": f"llama {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, {prof.dtype}",
        "stages": [f"{s.device} blocks {s.blocks[0]}-{s.blocks[1] - 1}" for s in plan.stages],
        "one_process_tokens_per_s": anchor, "two_nodes_tokens_per_s": ours, "ratio": ours / anchor,
        "step_ms": step * 1000, "stage_compute_ms": [c * 1000 for c in comp],
        "link_and_wakeups_ms": (step - sum(comp)) * 1000,
        "link_rtt_ms": link.rtt_s * 1000 if link else None,
        "link_gb_per_s": link.bandwidth_bytes_per_s / 1e9 if link else None,
        "bytes_per_token_between_stages": stats.stages[0].bytes_sent // max(stats.stages[0].forwards, 1),
        "runs": a.repeat, "new_tokens": a.new_tokens, "link": a.links[0], "by_link": by_link,
    }
    print(f"{rows['model']}; stages: {'; '.join(rows['stages'])}")
    print(f"{'decode tokens/s':<34}{'ours (2 nodes)':>16}{'one process':>14}{'ratio':>8}")
    print(f"{'':<34}{ours:>16.1f}{anchor:>14.1f}{ours / anchor:>7.2f}x")
    print(f"where a decode step goes (ours, {step * 1000:.2f} ms):")
    for i, c in enumerate(comp):
        print(f"  stage {i} compute ({plan.stages[i].device}){'':<6}{c * 1000:>8.2f} ms")
    print(f"  Link hops ({'/'.join(dict.fromkeys(transports[a.links[0]]))}), wake-ups{'':<7}"
          f"{(step - sum(comp)) * 1000:>8.2f} ms  "
          f"(3 hops/token; node1->node2 RTT {rows['link_rtt_ms'] or 0:.3f} ms, "
          f"{rows['bytes_per_token_between_stages']} B/token between stages incl. the prefill)")
    if len(a.links) > 1:
        for name, b in by_link.items():
            print(f"  --link {name:<6} hops {' '.join(b['transports']):<16} {b['tokens_per_s']:>8.1f} tokens/s "
                  f"{b['ratio']:>6.2f}x of one process; outside the stages' compute {b['link_and_wakeups_ms']:.3f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
