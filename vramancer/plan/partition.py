"""The partitioner: contiguous block ranges over an ordered list of devices, by dynamic programming.

For one device order, ``dp[j][i]`` is the best cost of placing blocks [0, i) on the first j
devices, each device taking one contiguous (possibly empty) range whose memory fits its capacity.
The cost is a triple compared lexicographically: (blocks placed off the GPUs, time, -headroom), so a
placement with fewer offloaded blocks always wins; among those, the faster one; among equally fast
ones, the one whose fullest device keeps the most free memory (room for a longer context: no
"GPU 0 packed to the brim" while a twin GPU idles). Time is counted in quanta of 0.5% of the
model's total time, so differences below that (a hop's 25 us, float noise) count as ties; a range's
quanta are differences of rounded prefix sums, so the quanta of consecutive ranges on one kind of
device add up to the same total wherever the cut falls. Time
is summed over stages for the ``latency`` objective (one stream walks every stage in turn) and
maxed for ``throughput`` (with many streams in flight the slowest stage sets the pace); headroom
is the smallest free fraction (capacity - used) / capacity over the GPU stages (host RAM and disk
have no say: spreading blocks from host RAM onto disk must never look better for "headroom").

Which device order to use is the planner's choice: orders that differ only by swapping identical
devices are the same; all distinct orders of the GPUs are tried when there are few, a set of
speed- and size-sorted orders otherwise. Host RAM and disk always come after the GPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..devices.device import Device
from .memory import BlockTable

__all__ = ["Placement", "partition", "candidate_orders", "time_quantum", "MAX_ORDERS", "TIME_QUANTUM_FRACTION"]

INF = (math.inf, math.inf, math.inf)
MAX_ORDERS = 120
TIME_QUANTUM_FRACTION = 5e-3


def time_quantum(seconds: list[list[float]]) -> float:
    """0.5% of the model's time on its fastest devices: the resolution at which placements differ."""
    n = len(seconds[0]) if seconds else 0
    total = sum(min(row[b] for row in seconds) for b in range(n))
    return max(total * TIME_QUANTUM_FRACTION, 1e-12)


@dataclass
class Placement:
    """ranges[s] = (device index in the order given to ``partition``, start, end); cost as in the DP."""

    ranges: list[tuple[int, int, int]]
    cost: tuple[float, float, float]
    order: list[int]


def _signature(d: Device) -> tuple:
    return (d.catalog_key or d.name, d.free_bytes, d.bandwidth_bytes_per_s, d.tflops, d.kind)


def candidate_orders(devices: list[Device], max_orders: int = MAX_ORDERS) -> list[list[int]]:
    """Device index orders to try: GPUs permuted (identical GPUs not swapped), then cpu, then disk."""
    gpus = [i for i, d in enumerate(devices) if d.kind == "gpu"]
    tail = ([i for i, d in enumerate(devices) if d.kind == "cpu"]
            + [i for i, d in enumerate(devices) if d.kind == "disk"])

    def speed(i: int) -> float:
        return devices[i].bandwidth_bytes_per_s

    def cap(i: int) -> int:
        return devices[i].free_bytes

    heuristics = [
        sorted(gpus, key=lambda i: (-speed(i), -cap(i), i)),
        sorted(gpus, key=lambda i: (-cap(i), -speed(i), i)),
        sorted(gpus, key=lambda i: (speed(i), cap(i), i)),
        sorted(gpus, key=lambda i: (cap(i), speed(i), i)),
        list(gpus),
    ]
    seen: set[tuple] = set()
    out: list[list[int]] = []

    def add(order: list[int]) -> None:
        key = tuple(_signature(devices[i]) for i in order)
        if key not in seen:
            seen.add(key)
            out.append(order + tail)

    for h in heuristics:
        add(h)
    for order in _distinct_orders(heuristics[0], [_signature(devices[i]) for i in heuristics[0]]):
        if len(out) >= max_orders:
            break
        add(order)
    return out


def _distinct_orders(items: list[int], keys: list[tuple]):
    """Orders of ``items`` that differ in their sequence of keys (identical devices never swapped):
    8 identical GPUs give 1 order, not 40320. Iterative (the next permutation of a multiset, in
    lexicographic order), so any number of devices costs no recursion depth."""
    groups: dict[tuple, list[int]] = {}
    for i, k in zip(items, keys):
        groups.setdefault(k, []).append(i)
    kinds = list(groups)
    seq = sorted(g for g, k in enumerate(kinds) for _ in groups[k])
    while True:
        used = [0] * len(kinds)
        order = []
        for g in seq:
            order.append(groups[kinds[g]][used[g]])
            used[g] += 1
        yield order
        i = len(seq) - 2
        while i >= 0 and seq[i] >= seq[i + 1]:
            i -= 1
        if i < 0:
            return
        j = len(seq) - 1
        while seq[j] <= seq[i]:
            j -= 1
        seq[i], seq[j] = seq[j], seq[i]
        seq[i + 1:] = reversed(seq[i + 1:])


def partition(table: BlockTable, devices: list[Device], order: list[int], capacity: list[int],
              seconds: list[list[float]], hop_seconds: list[float], objective: str = "latency",
              offload: list[bool] | None = None, quantum: float | None = None) -> Placement | None:
    """Best placement of all blocks over ``devices`` taken in ``order``.

    capacity[d]     bytes device d may hold for weights + KV + activations (its reserve already taken off)
    seconds[d][b]   time of block b on device d
    hop_seconds[d]  time to move the hidden state into a stage on device d from the previous stage
    offload[d]      True for tiers whose blocks count as "left off the GPUs"
    quantum         seconds per time unit of the cost (default: ``time_quantum(seconds)``)
    Returns None when no placement fits.
    """
    if quantum is None:
        quantum = time_quantum(seconds)
    n = table.n
    m = len(order)
    if offload is None:
        offload = [devices[d].kind != "gpu" for d in range(len(devices))]
    is_sum = objective != "throughput"
    W, KV, ACT, LOG, SH = table.weights, table.kv, table.act, table.logits, table.shared
    prev_row = [INF] * (n + 1)
    prev_row[0] = (0, 0, -1.0)
    choices: list[list[int]] = []
    for j in range(m):
        d = order[j]
        cap = capacity[d]
        secs = seconds[d]
        pref = [0] * (n + 1)           # rounded prefix sums, in quanta
        acc = 0.0
        for b in range(n):
            acc += secs[b]
            pref[b + 1] = round(acc / quantum)
        hop = round(hop_seconds[d] / quantum)
        off = offload[d]
        row = list(prev_row)            # empty range on device j: dp unchanged
        arg = list(range(n + 1))        # arg[i] == i means empty
        for i in range(1, n + 1):
            best = row[i]
            best_k = i
            w = kv = logits = 0
            act = 0
            shared: dict[str, int] = {}
            for k in range(i - 1, -1, -1):
                w += W[k]
                kv += KV[k]
                logits += LOG[k]
                if ACT[k] > act:
                    act = ACT[k]
                if SH[k]:
                    shared.update(SH[k])
                mem = w + kv + act + logits + (sum(shared.values()) if shared else 0)
                if mem > cap:
                    break
                p = prev_row[k]
                if p[0] == math.inf:
                    continue
                t = pref[i] - pref[k] + (hop if k > 0 else 0)
                n_off = p[0] + ((i - k) if off else 0)
                neg_headroom = p[2] if off else max(p[2], (mem - cap) / cap if cap > 0 else 0.0)
                val = (n_off, p[1] + t, neg_headroom) if is_sum else (n_off, max(p[1], t), neg_headroom)
                if val < best:
                    best, best_k = val, k
            row[i] = best
            arg[i] = best_k
        choices.append(arg)
        prev_row = row
    if prev_row[n][0] == math.inf:
        return None
    ranges: list[tuple[int, int, int]] = []
    i = n
    for j in range(m - 1, -1, -1):
        k = choices[j][i]
        if k < i:
            ranges.append((order[j], k, i))
            i = k
    if i != 0:  # pragma: no cover - dp invariant
        return None
    ranges.reverse()
    return Placement(ranges=ranges, cost=prev_row[n], order=order)
