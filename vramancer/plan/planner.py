"""plan(profile, devices, workload) -> Plan: a pure function; nothing is loaded, torch is not imported
for a catalog model.

Steps: check the workload; profile the model; subtract each device's reserve; find the best
contiguous placement over GPUs (then host RAM, then disk) with the partitioner; choose for each
offloaded stage whether to execute it where it lives or stream it to a GPU; predict speeds;
compute the largest context this placement holds; say what would make it fit when it does not.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..devices.device import Device
from ..errors import BadInputError, DoesNotFitError, WorkloadError
from ..models.profile import ModelProfile
from ..units import format_bytes, parse_bytes
from .advice import Planning, advise
from .cost import CostModel
from .exports import device_map, engine_device_names, llama_cpp_flags, vllm_layer_partition
from .memory import BlockTable, default_reserve_bytes
from .partition import MAX_ORDERS, Placement, candidate_orders, partition, time_quantum
from .plan import HOST_COMPUTE, ModelIdentity, Plan, PlanBlock, Prediction, Stage, StreamBuffer, Workload

__all__ = ["plan", "plan_profile", "plan_placement", "check_workload", "check_split", "check_reserve",
           "stream_buffer_bytes", "request_seconds", "placement_exists", "default_context", "DEFAULT_CONTEXT",
           "SMALLER_DTYPES"]

# what to suggest, in order, when a model does not fit: each smaller than the one before
SMALLER_DTYPES = ["float16", "int8", "q6_k", "q4_k_m", "q3_k_m"]
_MAX_CONTEXT_CAP = 1 << 22
DEFAULT_CONTEXT = 4096


# The partitioner's work is ~devices x blocks^2 per device order: one plan's search tries as many
# orders as fit SEARCH_CELLS, and a problem whose single order exceeds MAX_PROBLEM_CELLS (64 devices
# x 256 blocks, 4 x 1024) is refused in one line rather than searched for minutes.
SEARCH_CELLS = 1 << 24
MAX_PROBLEM_CELLS = 1 << 22
MAX_BUFFER_ROUNDS = 3       # searches again with room kept for host stream buffers found (sizes only grow)
# beyond any model's context (2**31 tokens) or batch: refused rather than searched
_MAX_TOKENS = 1 << 31
_MAX_BATCH = 1 << 20


def check_workload(context: Any, batch: Any, objective: str, prefill_chunk: Any) -> None:
    for name, v, most in (("context", context, _MAX_TOKENS), ("batch", batch, _MAX_BATCH),
                          ("prefill chunk", prefill_chunk, _MAX_TOKENS)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise WorkloadError(f"{name} must be a whole number of tokens, not {v!r:.40}")
        if v < 1:
            raise WorkloadError(f"{name} must be at least 1 (got {v})")
        if v > most:
            raise WorkloadError(f"{name} {v} is more than the {most} this planner takes")
    if objective not in ("latency", "throughput"):
        raise WorkloadError(f"objective must be 'latency' or 'throughput', not {objective!r}")


def check_split(split: Any) -> list[float] | None:
    """A manual split as proportions: finite, non-negative numbers with a positive sum
    (WorkloadError otherwise: ``inf,1``, ``nan``, ``-1,2``, ``0,0``, a string)."""
    if split is None:
        return None
    bad = WorkloadError("--split needs finite, non-negative proportions with a positive sum, like 3,1")
    if isinstance(split, (str, bytes)) or not hasattr(split, "__iter__"):
        raise bad
    parts = list(split)
    if not parts or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0
                        for x in parts):
        raise bad
    if not sum(parts) > 0 or not math.isfinite(sum(parts)):
        raise bad
    return [float(x) for x in parts]


def check_reserve(reserve_bytes: Any) -> int:
    """The per-GPU reserve in bytes: a size ("512MiB") or a finite, non-negative number
    (WorkloadError otherwise: NaN, infinity, negative, not a size)."""
    if isinstance(reserve_bytes, float) and not math.isfinite(reserve_bytes):
        raise WorkloadError(f"reserve must be a finite number of bytes, not {reserve_bytes!r}")
    try:
        return parse_bytes(reserve_bytes)
    except (BadInputError, ValueError, OverflowError, TypeError) as e:
        raise WorkloadError(f"reserve: {e}") from None


def _reserve(devices: list[Device], reserve_bytes: int | str | None) -> dict[str, int]:
    if reserve_bytes is None:
        return {d.id: default_reserve_bytes(d) for d in devices}
    r = check_reserve(reserve_bytes)
    # the person's reserve applies to GPUs; host and disk keep theirs (they hold the process itself)
    return {d.id: (r if d.kind == "gpu" else default_reserve_bytes(d)) for d in devices}


class _Planner:
    """One planning problem. ``offload_mode`` fixes how offloaded blocks are costed ("execute",
    "stream", or None for the faster of the two per block); ``staging_bytes`` is kept free, while
    searching, on the GPU that computes streamed blocks (its stream buffer), and ``keep_free``
    (device id -> bytes) on other devices, such as the host RAM that disk stages stream through. ``capacity`` is what
    each device holds after its reserve; the plan's stream buffers (``_stage_runs``) are counted on
    their devices next to the stages there."""

    def __init__(self, profile: ModelProfile, devices: list[Device], workload: Workload,
                 reserve: dict[str, int], offload_mode: str | None = None, staging_bytes: int = 0,
                 keep_free: dict[str, int] | None = None):
        self.profile = profile
        self.offload_mode = offload_mode
        self.devices = devices
        self.workload = workload
        self.reserve = reserve
        self.table = BlockTable(profile, workload.context, workload.batch, workload.prefill_chunk)
        self.cost = CostModel(profile, workload.context, workload.batch, workload.prefill_chunk)
        self.capacity = [max(0, d.free_bytes - reserve[d.id]) for d in devices]
        gpus = [d for d in devices if d.kind == "gpu"]
        self.stream_gpu = max(gpus, key=lambda d: (d.bandwidth_bytes_per_s, d.free_bytes)) if gpus else None
        self.search_capacity = list(self.capacity)
        if staging_bytes and self.stream_gpu is not None:
            i = devices.index(self.stream_gpu)
            self.search_capacity[i] = max(0, self.capacity[i] - staging_bytes)
        for i, d in enumerate(devices):   # room kept for stream buffers found on a device (the host's)
            self.search_capacity[i] = max(0, self.search_capacity[i] - (keep_free or {}).get(d.id, 0))
        self.exec_time: list[list[tuple[float, float]]] = []
        self.stream_time: list[list[tuple[float, float]] | None] = []
        for d in devices:
            self.exec_time.append([self.cost.execute_seconds(b, d) for b in profile.blocks])
            if d.kind != "gpu" and self.stream_gpu is not None:
                self.stream_time.append([self.cost.stream_seconds(b, d, self.stream_gpu) for b in profile.blocks])
            else:
                self.stream_time.append(None)

    def block_seconds(self, d: int, which: int) -> list[float]:
        """Per-block time on device d used by the objective (which: 0 decode, 1 prefill)."""
        ex = [t[which] for t in self.exec_time[d]]
        st = self.stream_time[d]
        if st is None or self.offload_mode == "execute":
            return ex
        if self.offload_mode == "stream":
            return [s[which] for s in st]
        return [min(a, s[which]) for a, s in zip(ex, st)]

    def hops(self) -> list[float]:
        ref = self.stream_gpu or self.devices[0]
        return [self.cost.hop_seconds(ref, d)[0] for d in self.devices]

    def search(self, gpu_only: bool = False, max_orders: int = MAX_ORDERS) -> Placement | None:
        devs = self.devices
        capacity = list(self.search_capacity)
        if gpu_only:
            capacity = [c if d.kind == "gpu" else -1 for c, d in zip(capacity, devs)]
        seconds = [self.block_seconds(i, 0) for i in range(len(devs))]
        hops = self.hops()
        n = self.table.n
        if n > 64:  # large models: fewer orders keep planning well under a second
            max_orders = min(max_orders, 24)
        # every partition costs ~devices x blocks^2 steps: the orders tried fit one work budget
        max_orders = max(1, min(max_orders, SEARCH_CELLS // (len(devs) * n * n or 1)))
        quantum = time_quantum(seconds)
        orders = candidate_orders(devs, max_orders)
        best: Placement | None = None
        for order in orders:
            p = partition(self.table, devs, order, capacity, seconds, hops, self.workload.objective,
                          quantum=quantum)
            if p is not None and (best is None or p.cost < best.cost):
                best = p
        if (best is None or best.cost[0] > 0) and n >= 3:
            # also when nothing fits with each device once: a GPU used twice may hold it all
            best = self._head_back_on_a_gpu(best, orders, capacity, seconds, hops, quantum)
        return best

    def _head_back_on_a_gpu(self, best: Placement | None, orders: list[list[int]], capacity: list[int],
                            seconds: list[list[float]], hops: list[float], quantum: float) -> Placement | None:
        """When blocks must leave the GPUs, the pipeline may come back to a GPU for the last block
        (final norm + LM head, and its logits): host RAM then runs only repeated layers. With tied
        embeddings the head costs the GPU holding the embedding no extra weights."""
        t = self.table
        n = t.n
        rest = t.without_last()
        head = t.range_memory(n - 1, n)
        budget = max(1, SEARCH_CELLS // (len(self.devices) * n * n or 1))   # partitions, as in search()
        for h, dev in enumerate(self.devices):
            if dev.kind != "gpu" or budget <= 0:
                continue
            cap = list(capacity)
            # the head's own weights and KV; its workspace only beyond what the layers' already is
            # (ranges on one device never run at once); the exact check on h follows below
            cap[h] -= (head.weights_bytes - sum(t.shared[n - 1].values()) + head.kv_cache_bytes
                       + max(0, head.activation_bytes - max(rest.act, default=0)))
            if cap[h] <= 0:
                continue
            head_q = round(seconds[h][n - 1] / quantum) + round(hops[h] / quantum)
            for order in orders:
                if budget <= 0:
                    break
                budget -= 1
                p = partition(rest, self.devices, order, cap, [row[:-1] for row in seconds], hops,
                              self.workload.objective, quantum=quantum)
                if p is None:
                    continue
                ranges = p.ranges + [(h, n - 1, n)]
                on_h = [(s, e) for d, s, e in ranges if d == h]
                if t.ranges_memory(on_h).total_bytes > capacity[h]:
                    continue  # the tied weights were not on h after all
                if self.workload.objective == "throughput":
                    cost = (p.cost[0], max(p.cost[1], head_q), p.cost[2])
                else:
                    cost = (p.cost[0], p.cost[1] + head_q, p.cost[2])
                if best is None or cost < best.cost:
                    best = Placement(ranges=ranges, cost=cost, order=order)
        return best


def _device_ranges(ranges: list[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for d, s, e in ranges:
        out.setdefault(d, []).append((s, e))
    return out


def _max_context(profile: ModelProfile, workload: Workload, ranges: list[tuple[int, int, int]],
                 capacity: list[int], extra: dict[int, int]) -> int:
    """Largest context at which every stage of this placement still fits (binary search; memory
    grows monotonically with context)."""

    def fits(ctx: int) -> bool:
        t = BlockTable(profile, ctx, workload.batch, workload.prefill_chunk)
        return all(t.ranges_memory(rs).total_bytes + extra.get(d, 0) <= capacity[d]
                   for d, rs in _device_ranges(ranges).items())

    hi_cap = profile.max_position_embeddings or _MAX_CONTEXT_CAP
    lo = 0
    if fits(workload.context):
        lo = workload.context
    hi = max(hi_cap, workload.context)
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _manual_placement(pl: _Planner, split: list[float]) -> list[tuple[int, int, int]]:
    """Proportions over the GPUs in the order given (like llama.cpp --tensor-split): repeated layers
    shared out by cumulative rounding; block 0 with the first GPU used, the head with the last."""
    gpus = [i for i, d in enumerate(pl.devices) if d.kind == "gpu"]
    if len(split) != len(gpus):
        raise WorkloadError(f"--split has {len(split)} parts but there are {len(gpus)} GPUs")
    split = check_split(split)
    n = pl.table.n
    layers = n - 2 if n > 2 else n
    total = float(sum(split))
    bounds, acc = [], 0.0
    for x in split:
        acc += x
        bounds.append(round(layers * acc / total))
    ranges: list[tuple[int, int, int]] = []
    prev = 0
    for g, b in zip(gpus, bounds):
        if b > prev:
            ranges.append((g, prev, b))
        prev = b
    if n > 2:  # shift by the embedding block, then give block 0 and the head to the end GPUs
        ranges = [(g, s + 1, e + 1) for g, s, e in ranges]
        g0, s0, e0 = ranges[0]
        ranges[0] = (g0, 0, e0)
        gl, sl, el = ranges[-1]
        ranges[-1] = (gl, sl, n)
    return ranges


def plan_profile(profile: ModelProfile, devices: list[Device], workload: Workload,
                 reserve_bytes: int | str | None = None, split: list[float] | None = None,
                 suggest: bool = True, moe_experts_on_host: bool = True) -> Plan:
    check_workload(workload.context, workload.batch, workload.objective, workload.prefill_chunk)
    reserve = _reserve(devices, reserve_bytes)
    cells = len(devices) * profile.num_blocks ** 2
    if cells > MAX_PROBLEM_CELLS:
        raise WorkloadError(f"{len(devices)} devices x {profile.num_blocks} blocks is beyond what the planner "
                            f"searches (devices x blocks^2 at most {MAX_PROBLEM_CELLS}); give fewer devices")
    pl = _Planner(profile, devices, workload, reserve)
    notes: list[str] = []
    if profile.max_position_embeddings and workload.context > profile.max_position_embeddings:
        notes.append(f"context {workload.context} is beyond the model's trained maximum of "
                     f"{profile.max_position_embeddings} tokens")

    if split is not None:
        ranges = _manual_placement(pl, list(split))
        return _assemble(pl, profile, devices, workload, ranges, notes, split, reserve_bytes, suggest)
    placement = pl.search()
    keep_free: dict[str, int] = {}
    for _ in range(MAX_BUFFER_ROUNDS):
        # A disk stage streams through a buffer in host RAM that the search did not see: search
        # again with that room kept on the host, until the buffers found fit beside the stages.
        if placement is None:
            break
        trial = _assemble(pl, profile, devices, workload, placement.ranges, list(notes), None, reserve_bytes,
                          False, offload_mode="execute")
        over = trial.device_shortfalls()
        grow = {b.device: b.buffer_bytes for b in trial.stream_buffers
                if b.device in over and b.buffer_bytes > keep_free.get(b.device, 0)}
        if not grow:
            break
        keep_free.update(grow)
        pl_kept = _Planner(profile, devices, workload, reserve, keep_free=keep_free)
        kept = pl_kept.search()
        if kept is None:
            break
        pl, placement = pl_kept, kept
    if placement is None:
        need = sum(pl.table.weights) + sum(pl.table.kv) + max(pl.table.act, default=0)
        short = max(need - sum(pl.capacity), 1)
        sugg = _suggestions(pl, profile, devices, workload, reserve_bytes, short, anywhere=True) if suggest else []
        raise DoesNotFitError(
            f"{profile.name} does not fit on {', '.join(d.id for d in devices)}: "
            f"{format_bytes(short)} short at context {workload.context}"
            + (f"; to fit: {'; or '.join(sugg)}" if sugg else ""), shortfall_bytes=short, suggestions=sugg)
    best = _assemble(pl, profile, devices, workload, placement.ranges, list(notes), None, reserve_bytes, False,
                     offload_mode="execute")
    if best.offloaded and pl.stream_gpu is not None and resident_weights_only(profile):
        best.notes.append(f"{profile.quantization or profile.dtype} weights stay where they are loaded: the "
                          "offloaded blocks run where they are (the runtime streams only float and GGUF weights)")
    elif best.offloaded and pl.stream_gpu is not None:
        # Streaming offloaded blocks to a GPU needs a double buffer there: plan again with that room
        # kept on the streaming GPU. Of executing the offloaded blocks where they are, streaming them
        # to the GPU, and running them per phase (plan/phase.py: decode on the host, prefill streamed),
        # keep what serves the representative request soonest, even when the buffer pushes a few
        # more blocks off the GPUs.
        streamed_bytes = _streamed_block_bytes(pl.table)
        staging = max(stream_buffer_bytes(streamed_bytes, s.blocks) for s in best.offloaded)
        pl_stream = _Planner(profile, devices, workload, reserve, offload_mode="stream", staging_bytes=staging,
                             keep_free=keep_free)
        placement_s = pl_stream.search()
        if placement_s is not None:
            from .phase import phase_note, phased

            streamed = _assemble(pl_stream, profile, devices, workload, placement_s.ranges, list(notes), None,
                                 reserve_bytes, False, offload_mode="stream")
            n_off = sum(s.num_blocks for s in best.offloaded)
            gpus = {d.id for d in devices if d.kind == "gpu"}
            executed = best
            if all(s.compute_device in gpus for s in streamed.offloaded):
                ph = phased(streamed, profile, devices, workload)
                for cand in (streamed, ph):
                    if cand is not None and request_seconds(cand) < request_seconds(best):
                        best = cand
            if best is not executed:
                gain = request_seconds(executed) / request_seconds(best)
                more = sum(s.num_blocks for s in best.offloaded) - n_off
                buf = sum(b.buffer_bytes for b in best.stream_buffers)
                if best is streamed:
                    best.notes.append(
                        f"the offloaded blocks stream through a GPU: a request is served {gain:.1f}x sooner than "
                        f"executing them where they are ({executed.predicted.decode_tokens_per_s:g} tokens/s "
                        f"decode, {executed.predicted.prefill_tokens_per_s:g} prefill)"
                        + (f", though its {format_bytes(buf)} double buffer pushes {more} more blocks off "
                           "the GPUs" if more > 0 else ""))
                else:
                    best.notes.append(phase_note(best, executed, "executing them where they are", gain)
                                      + (f"; its {format_bytes(buf)} double buffer pushes {more} more blocks "
                                         "off the GPUs" if more > 0 else ""))
    if best.offloaded and moe_experts_on_host:
        from .experts import experts_on_host

        alt = experts_on_host(profile, devices, workload, reserve_bytes, best, plan_profile)
        if alt is not None and request_seconds(alt) < request_seconds(best):
            return alt
    if best.offloaded and suggest and any(d.kind == "gpu" for d in devices):  # no GPU: nothing to fit
        best.suggestions = _suggestions(pl, profile, devices, workload, reserve_bytes, best.shortfall_bytes,
                                        current=best)
    return best


def resident_weights_only(profile: ModelProfile) -> bool:
    """Weights quantized on load (``--dtype nf4|int4|int8``) or stored by bitsandbytes: the runtime
    keeps every stage resident (execute mode), so the planner never streams them."""
    from ..models.dtypes import DTYPES

    dt = DTYPES.get(profile.dtype)
    return (dt is not None and dt.on_load is not None) or profile.quantization == "bitsandbytes"


# a representative request for choosing between plans: a prompt filling half the context, then this many new tokens
REQUEST_NEW_TOKENS = 256


def stream_buffer_bytes(block_bytes: list[int], blocks: tuple[int, int]) -> int:
    """The double buffer that streams blocks [start, end): two slots (a block runs from one while
    the next is copied into the other), each as large as the largest of these blocks. The runtime
    allocates exactly this (see runtime/stream.py: slots packed without padding)."""
    s, e = blocks
    return 2 * max(block_bytes[s:e], default=0)


def _streamed_block_bytes(table: BlockTable) -> list[int]:
    """Bytes a stream slot holds per block: its own weights and the tied ones it uses."""
    return [w + sum(sh.values()) for w, sh in zip(table.weights, table.shared)]


def request_seconds(plan: Plan) -> float:
    """Seconds a plan takes to serve one representative request (prefill half the context, decode 256)."""
    w = plan.workload
    p = plan.predicted
    # speeds are rounded in the Prediction: a very slow plan may read 0.0 (then it is as slow as can be)
    return ((w.context / 2 * w.batch) / max(p.prefill_tokens_per_s, 1e-3)
            + REQUEST_NEW_TOKENS * w.batch / max(p.decode_tokens_per_s, 1e-3))


def plan_placement(profile: ModelProfile, devices: list[Device], workload: Workload, block_devices: list[str],
                   offload_mode: str | None = None, reserve_bytes: int | str | None = None) -> Plan:
    """The Plan of a placement made elsewhere (e.g. accelerate's device_map): ``block_devices[b]`` is
    the device id of block b; runs of the same device become stages. ``offload_mode`` forces
    "stream" or "execute" for offloaded stages (None: the cost model chooses). Used to judge other
    tools' placements with the same memory and speed model."""
    check_workload(workload.context, workload.batch, workload.objective, workload.prefill_chunk)
    if len(block_devices) != profile.num_blocks:
        raise WorkloadError(f"placement names {len(block_devices)} blocks, the model has {profile.num_blocks}")
    index = {d.id: i for i, d in enumerate(devices)}
    ranges: list[tuple[int, int, int]] = []
    for b, dev_id in enumerate(block_devices):
        if dev_id not in index:
            raise WorkloadError(f"placement names unknown device {dev_id!r}")
        if ranges and ranges[-1][0] == index[dev_id] and ranges[-1][2] == b:
            ranges[-1] = (ranges[-1][0], ranges[-1][1], b + 1)
        else:
            ranges.append((index[dev_id], b, b + 1))
    pl = _Planner(profile, devices, workload, _reserve(devices, reserve_bytes))
    return _assemble(pl, profile, devices, workload, ranges, [], None, reserve_bytes, False, offload_mode)


def _assemble(pl: _Planner, profile: ModelProfile, devices: list[Device], workload: Workload,
              ranges: list[tuple[int, int, int]], notes: list[str], split: list[float] | None,
              reserve_bytes: int | str | None, suggest: bool, offload_mode: str | None = None) -> Plan:
    table = pl.table
    runs = _stage_runs(pl, devices, ranges, offload_mode)
    buffers: dict[int | None, int] = {}        # compute device index (None: the host outside the plan) -> bytes
    buffer_stages: dict[int | None, list[int]] = {}
    for si, run in enumerate(runs):
        if run.mode == "stream":
            buffers[run.compute] = max(buffers.get(run.compute, 0), run.buffer_bytes)
            buffer_stages.setdefault(run.compute, []).append(si)
    extra = {d: b for d, b in buffers.items() if d is not None}

    names = engine_device_names(devices)
    stages: list[Stage] = []
    block_device: list[str] = [""] * table.n
    fits = True
    overflow: list[str] = []
    prev_dev: Device | None = None
    hop_dec = hop_pre = 0.0
    used_on: dict[str, int] = {}
    seen_ranges: dict[int, list[tuple[int, int]]] = {}
    for si, (d, s, e) in enumerate(ranges):
        dev = devices[d]
        mem = table.range_memory(s, e)
        run = runs[si]
        compute = devices[run.compute].id if run.compute is not None else HOST_COMPUTE
        if run.mode == "stream" and run.compute is not None and devices[run.compute].kind == "gpu":
            dec = sum(pl.stream_time[d][b][0] for b in range(s, e))
            pre = sum(pl.stream_time[d][b][1] for b in range(s, e))
        else:
            dec = sum(pl.exec_time[d][b][0] for b in range(s, e))
            pre = sum(pl.exec_time[d][b][1] for b in range(s, e))
        # a device holding two stages (a placement made elsewhere may return to it) keeps one
        # reserve (and at most one stream buffer, the plan's); its capacity is checked for all its stages together
        again = dev.id in used_on
        if again:  # report what this stage adds to what the device already holds
            before = table.ranges_memory(seen_ranges[d])
            after = table.ranges_memory(seen_ranges[d] + [(s, e)])
            mem = type(mem)(after.weights_bytes - before.weights_bytes, after.kv_cache_bytes - before.kv_cache_bytes,
                            after.activation_bytes - before.activation_bytes)
        seen_ranges.setdefault(d, []).append((s, e))
        st = Stage(device=dev.id, kind=dev.kind, blocks=(s, e), weights_bytes=mem.weights_bytes,
                   kv_cache_bytes=mem.kv_cache_bytes, activation_bytes=mem.activation_bytes,
                   reserve_bytes=0 if again else pl.reserve[dev.id], capacity_bytes=dev.free_bytes, mode=run.mode,
                   compute_device=compute, torch_device=dev.torch_device,
                   decode_seconds=dec, prefill_seconds=pre)
        if prev_dev is not None and prev_dev.id != dev.id:
            hd, hp = pl.cost.hop_seconds(prev_dev, dev)
            hop_dec += hd
            hop_pre += hp
        prev_dev = dev
        stages.append(st)
        for b in range(s, e):
            block_device[b] = dev.id
        if dev.kind != "gpu":
            fits = False
        used_on[dev.id] = used_on.get(dev.id, 0) + st.total_bytes
    for d, nbytes in extra.items():
        used_on[devices[d].id] = used_on.get(devices[d].id, 0) + nbytes
    for dev in devices:
        if used_on.get(dev.id, 0) > dev.free_bytes:
            fits = False
            overflow.append(f"{dev.id} needs {format_bytes(used_on[dev.id] - dev.free_bytes)} more")

    stage_ranges = [(devices[d].id, s, e) for d, s, e in ranges]
    batch = workload.batch
    step_dec, step_pre = pl.cost.step_seconds()   # the host's generation loop, once per step
    total_dec = sum(s.decode_seconds for s in stages) + hop_dec + step_dec
    total_pre = sum(s.prefill_seconds for s in stages) + hop_pre + step_pre
    if workload.objective == "throughput" and len(stages) > 1:
        # with enough sequences in flight every stage works at once: the slowest stage sets the pace
        bottleneck = max(s.decode_seconds for s in stages)
        decode_tps = batch / bottleneck
        prefill_tps = table.chunk_tokens / max(s.prefill_seconds for s in stages)
    else:
        decode_tps = batch / total_dec
        prefill_tps = table.chunk_tokens / total_pre
    predicted = Prediction(
        decode_tokens_per_s=round(decode_tps, 3),
        prefill_tokens_per_s=round(prefill_tps, 1),
        decode_ms_per_step=round(total_dec * 1e3, 3),
        bottleneck_stage=max(range(len(stages)), key=lambda i: stages[i].decode_seconds),
    )
    max_ctx = _max_context(profile, workload, ranges, pl.capacity, extra) if not overflow else 0

    plan = Plan(
        model=profile.name, identity=ModelIdentity.of(profile.config, workload.dtype), workload=workload,
        fits=fits and not overflow, stages=stages,
        blocks=[PlanBlock(name=b.name, weights_bytes=b.weights_bytes, shared_bytes=sum(b.shared.values()),
                          kv_bytes_per_token=b.kv_bytes_per_token, device=block_device[i],
                          modules=tuple(b.modules), layer_index=_layer_index(profile.layers_prefix, b.modules))
                for i, b in enumerate(profile.blocks)],
        stream_buffers=[StreamBuffer(devices[d].id if d is not None else HOST_COMPUTE, nbytes,
                                     tuple(buffer_stages[d])) for d, nbytes in buffers.items()],
        max_context=max_ctx, predicted=predicted,
        device_map=device_map(profile, block_device, names),
        exports={}, devices=list(devices), notes=notes, manual_split=list(split) if split else None,
    )
    if profile.kind == "causal-lm":
        plan.exports = {"llama_cpp": llama_cpp_flags(profile, stage_ranges, devices, workload.context, batch,
                                                   kv_dtype=workload.kv_dtype)}
        if all(devices[d].kind == "gpu" for d, _, _ in ranges):  # vLLM's pipeline stages are GPUs only
            plan.exports["vllm_pp_layer_partition"] = vllm_layer_partition(profile, stage_ranges, devices)
    if overflow:
        plan.shortfall_bytes = sum(max(0, used_on.get(d.id, 0) - d.free_bytes) for d in devices)
        plan.notes.append("this placement does not fit: " + "; ".join(overflow))
    elif not fits:
        off = [s for s in stages if s.kind != "gpu"]
        plan.shortfall_bytes = sum(s.weights_bytes + s.kv_cache_bytes for s in off)
        nblocks = sum(s.num_blocks for s in off)
        if not any(d.kind == "gpu" for d in devices):   # nothing failed to fit: there is no GPU to fit on
            plan.notes.append(f"no GPU in the devices: all {nblocks} blocks run from "
                              + ", ".join(f"{s.device} ({s.mode})" for s in off))
        else:
            plan.notes.append(
                f"does not fit on the GPUs: {nblocks} of {table.n} blocks "
                f"({format_bytes(plan.shortfall_bytes)}) go to "
                + ", ".join(f"{s.device} ({s.mode})" for s in off))
        if suggest and any(d.kind == "gpu" for d in devices):
            plan.suggestions = _suggestions(pl, profile, devices, workload, reserve_bytes, plan.shortfall_bytes,
                                            current=plan)
    return plan


@dataclass(frozen=True)
class _Run:
    """How one stage runs: ``mode``, the index of its ``compute`` device (None: the host, for a disk
    stage when the plan lists no host device), and the stream buffer it needs there."""

    mode: str
    compute: int | None
    buffer_bytes: int = 0


def _stage_runs(pl: _Planner, devices: list[Device], ranges: list[tuple[int, int, int]],
                offload_mode: str | None) -> list[_Run]:
    """Per stage: GPU stages execute; an offloaded stage streams to a GPU of the plan when the cost
    model (or ``offload_mode``) prefers it and the GPU has room for the stream buffer, else it
    executes where it is, except the disk tier, which always streams (to the host)."""
    table = pl.table
    block_bytes = _streamed_block_bytes(table)
    buffers: dict[int, int] = {}
    gpu_stage_devices = [d for d, _, _ in ranges if devices[d].kind == "gpu"]
    host = next((i for i, dv in enumerate(devices) if dv.kind == "cpu"), None)
    runs: list[_Run] = []
    for d, s, e in ranges:
        if devices[d].kind == "gpu":
            runs.append(_Run("execute", d))
            continue
        need = stream_buffer_bytes(block_bytes, (s, e))
        ex = sum(pl.exec_time[d][b][0] for b in range(s, e))
        st = pl.stream_time[d]
        prefer_stream = (st is not None and sum(st[b][0] for b in range(s, e)) < ex) if offload_mode is None \
            else offload_mode == "stream"
        run = None
        if st is not None and gpu_stage_devices and prefer_stream:
            # one double buffer per GPU, as large as the largest block streamed through it
            for g in sorted(dict.fromkeys(gpu_stage_devices), key=lambda i: -devices[i].bandwidth_bytes_per_s):
                used = table.ranges_memory([(s2, e2) for d2, s2, e2 in ranges if d2 == g]).total_bytes
                grown = max(buffers.get(g, 0), need)
                if used + grown <= pl.capacity[g]:
                    buffers[g] = grown
                    run = _Run("stream", g, need)
                    break
        if run is None:
            if devices[d].kind == "disk":   # read from its file into host RAM, run on the host
                run = _Run("stream", host, need)
            else:
                run = _Run("execute", d)
        runs.append(run)
    return runs


def _layer_index(layers_prefix: str, modules: list[str]) -> int | None:
    """Index in the repeated-layers list of the block whose module is ``<layers_prefix>.<i>``."""
    if not layers_prefix:
        return None
    for m in modules:
        hit = re.fullmatch(re.escape(layers_prefix) + r"\.(\d+)", m)
        if hit:
            return int(hit.group(1))
    return None


def placement_exists(profile: ModelProfile, devices: list[Device], workload: Workload,
                     reserve_bytes: int | str | None = None, gpu_only: bool = False) -> bool:
    """Whether the planner finds any placement of ``profile`` on ``devices`` (``gpu_only``: on their
    GPUs alone). Cheaper than a whole plan: for searching what would fit."""
    pl = _Planner(profile, devices, workload, _reserve(devices, reserve_bytes))
    return pl.search(gpu_only=gpu_only, max_orders=6) is not None


def default_context(profile: ModelProfile) -> int:
    """The context a plan sizes for when none is given: DEFAULT_CONTEXT, never beyond the model's
    trained maximum (max_position_embeddings, a GGUF's context_length)."""
    trained = profile.max_position_embeddings
    return min(DEFAULT_CONTEXT, trained) if trained else DEFAULT_CONTEXT


def planning() -> Planning:
    """The planner's entry points, for plan/advice.py (which plans with them and does not import this module)."""
    return Planning(plan_profile=plan_profile, plan_placement=plan_placement, placement_exists=placement_exists,
                    smaller_dtypes=tuple(SMALLER_DTYPES))


def _suggestions(pl: _Planner, profile: ModelProfile, devices: list[Device], workload: Workload,
                 reserve_bytes: int | str | None, shortfall: int, anywhere: bool = False,
                 current: Plan | None = None) -> list[str]:
    """What would make the model fit, as lines: plan/advice.py's ``advise``, the one place advice is
    made (each piece planned with it, with its figures). ``anywhere``: no placement on ``devices`` at
    all (``shortfall`` bytes short); else the plan made, ``current``, runs partly off the GPUs."""
    return [a.text for a in advise(planning(), profile, devices, workload, reserve_bytes=reserve_bytes,
                                   current=current, fits_nowhere=anywhere, shortfall_bytes=shortfall)]


def plan(model: Any, devices: Any = "auto", context: int | None = None, batch: int = 1, dtype: str | None = None,
         objective: str = "latency", split: list[float] | None = None, reserve_bytes: int | str | None = None,
         prefill_chunk: int = 512, backing: str = "cpu", moe_experts_on_host: bool = True,
         kv_dtype: str | None = None) -> Plan:
    """See vramancer.plan. Raises WorkloadError / DeviceSpecError / UnknownModelError (exit 2) and
    DoesNotFitError (exit 3). ``context`` None: ``default_context`` of the model. ``kv_dtype``: how
    the KV cache is stored (``--kv-dtype`` q8_0, fp8, bf16, ...; None: the compute dtype)."""
    from ..devices.spec import parse_devices

    check_workload(1 if context is None else context, batch, objective, prefill_chunk)
    split = check_split(split)
    if reserve_bytes is not None:
        check_reserve(reserve_bytes)
    from ..devices.spec import check_backing

    backing = check_backing(backing)
    if isinstance(model, ModelProfile):
        prof = model
    else:
        from ..models.resolve import profile as make_profile

        prof = make_profile(model, dtype=dtype)
    if kv_dtype is not None:
        from ..models.dtypes import resolve_kv_dtype
        from ..models.layout import with_kv_dtype

        kv_dtype = resolve_kv_dtype(kv_dtype).name
        prof = with_kv_dtype(prof, resolve_kv_dtype(kv_dtype))
    devs = parse_devices(devices, backing=backing)
    if context is None:
        context = default_context(prof)
    workload = Workload(context=context, batch=batch, dtype=prof.dtype, objective=objective,  # type: ignore[arg-type]
                        prefill_chunk=prefill_chunk, kv_dtype=kv_dtype)
    return plan_profile(prof, devs, workload, reserve_bytes=reserve_bytes, split=split,
                        moe_experts_on_host=moe_experts_on_host)
