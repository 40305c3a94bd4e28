"""MoE routed experts in host RAM (what llama.cpp's ``--n-cpu-moe N`` / ``-ot exps=CPU`` does): every
layer's attention, norms, router and shared experts stay on the GPUs, the routed experts of the
first N layers live in host RAM and are computed there by the CPU. A decode step then reads only
the top-k experts' weights of those layers from host RAM (plus two hidden-state hops per layer,
GPU -> CPU -> GPU), where offloading whole layers reads their attention and KV cache from host RAM
too. The planner keeps this placement when it serves a representative request sooner
(``planner.request_seconds``).

Planned by placing a "slim" profile (those layers without their routed experts) on the devices
with host RAM reduced by the experts' bytes, then adding the experts' time and the hops to the
slim plan's stages and prediction. Decode computes the experts on the CPU; a prefill forward (at
least ``PHASE_PREFILL_TOKENS`` tokens, as llama.cpp does for large batches) copies one layer's experts
to its GPU and computes them there, so every GPU keeps room for the largest experts module moved
(counted in its stage's ``activation_bytes``). N is the fewest layers whose experts must leave the GPUs
for every block to fit on them (more experts on the GPUs is never slower)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..devices.device import Device
from ..models.profile import BlockProfile, ModelProfile
from ..units import format_bytes
from .cost import LINK_EFFICIENCY, CostModel
from .plan import Plan, Prediction, Workload

__all__ = ["experts_blocks", "experts_modules", "experts_on_host", "llama_cpp_moe_flags"]

PlanFn = Callable[..., Plan]


def experts_modules(profile: ModelProfile) -> dict[int, str]:
    """{block index: the module holding its routed experts} for the blocks with routed experts whose
    module is known: the profile's, else (a GGUF file's profile names its tensors ``blk.N.ffn_*_exps``,
    not after a module) the architecture's own layout of the profile's config."""
    out = {i: b.experts_module for i, b in enumerate(profile.blocks) if b.experts_bytes > 0}
    if out and not all(out.values()) and profile.config:
        from ..errors import MalformedCheckpointError
        from ..models.arch import layout_from_config
        from ..models.layout import _experts_module

        try:
            layout = layout_from_config(dict(profile.config))
        except (KeyError, MalformedCheckpointError):
            layout = None
        if layout is not None and len(layout.blocks) == len(profile.blocks):
            for i, m in out.items():
                if not m:
                    out[i] = _experts_module([t.name for t in layout.blocks[i].tensors if t.role == "expert"])
    return {i: m for i, m in out.items() if m}


def experts_blocks(profile: ModelProfile) -> list[int]:
    """Indices of the blocks whose routed experts can move (known bytes and module), in layer order."""
    return sorted(experts_modules(profile))


def _slim(profile: ModelProfile, moved: list[int]) -> ModelProfile:
    blocks = list(profile.blocks)
    for i in moved:
        b = blocks[i]
        blocks[i] = replace(b, weights_bytes=b.weights_bytes - b.experts_bytes,
                            read_bytes_per_token=b.read_bytes_per_token - b.experts_read_bytes_per_token,
                            flops_per_token=b.flops_per_token - b.experts_flops_per_token)
    return replace(profile, blocks=blocks, notes=list(profile.notes))


def _experts_only(b: BlockProfile) -> BlockProfile:
    return BlockProfile(name=b.name + ".experts", weights_bytes=b.experts_bytes, modules=[b.experts_module],
                        read_bytes_per_token=b.experts_read_bytes_per_token, flops_per_token=b.experts_flops_per_token)


def llama_cpp_moe_flags(profile: ModelProfile, moved: list[int]) -> tuple[str, str]:
    """(``--n-cpu-moe N``, the equivalent ``-ot`` regex) for experts moved from the first N layers."""
    layers = [i - 1 for i in moved]   # block i is layer i-1
    alt = "|".join(str(n) for n in layers)
    return f"--n-cpu-moe {len(layers)}", f'-ot "blk\\.({alt})\\.ffn_(up|down|gate)_exps\\.=CPU"'


def _try(profile: ModelProfile, devices: list[Device], workload: Workload, reserve_bytes: int | str | None,
         moved: list[int], host: int, plan_fn: PlanFn) -> Plan | None:
    from ..errors import DoesNotFitError

    experts = sum(profile.blocks[i].experts_bytes for i in moved)
    if experts > devices[host].free_bytes:
        return None
    one = max(profile.blocks[i].experts_bytes for i in moved)   # a prefill's copy of one layer's experts
    devs = [replace(d, free_bytes=d.free_bytes - one) if d.kind == "gpu" else d for d in devices]
    if any(d.free_bytes < 0 for d in devs):
        return None
    devs[host] = replace(devices[host], free_bytes=devices[host].free_bytes - experts)
    try:
        sub = plan_fn(_slim(profile, moved), devs, workload, reserve_bytes=reserve_bytes, suggest=False,
                      moe_experts_on_host=False)
    except DoesNotFitError:
        return None
    return None if sub.offloaded or not sub.fits else sub


def experts_on_host(profile: ModelProfile, devices: list[Device], workload: Workload,
                    reserve_bytes: int | str | None, baseline: Plan, plan_fn: PlanFn) -> Plan | None:
    """The plan with the routed experts of the fewest first layers in host RAM that puts every
    block on the GPUs, or None (no MoE experts, no host device, no GPU, the baseline already on
    the GPUs, or no such N)."""
    cand = experts_blocks(profile)
    host = next((i for i, d in enumerate(devices) if d.kind == "cpu"), None)
    if not cand or host is None or not baseline.offloaded or not any(d.kind == "gpu" for d in devices):
        return None
    lo, hi, best = 1, len(cand), None
    while lo <= hi:                         # fits is monotone in N: binary search for the fewest
        mid = (lo + hi) // 2
        sub = _try(profile, devices, workload, reserve_bytes, cand[:mid], host, plan_fn)
        if sub is None:
            lo = mid + 1
        else:
            best, hi = (mid, sub), mid - 1
    if best is None:
        return None
    n, sub = best
    moved = cand[:n]
    return _finish(profile, devices, workload, sub, moved, host, baseline)


def _finish(profile: ModelProfile, devices: list[Device], workload: Workload, sub: Plan, moved: list[int],
            host: int, baseline: Plan) -> Plan:
    cost = CostModel(profile, workload.context, workload.batch, workload.prefill_chunk)
    host_dev = devices[host]
    by_id = {d.id: d for d in devices}
    stage_of = sub.block_stage_indices()
    modules = experts_modules(profile)
    extra_dec = extra_pre = 0.0
    copy_room: dict[str, int] = {}
    for i in moved:
        st = sub.stages[stage_of[i]]
        gpu = by_id[st.device]
        ex = _experts_only(profile.blocks[i])
        dec = cost.experts_decode_seconds(profile.blocks[i], host_dev)   # decode: on the CPU, two hidden-state hops
        hd, _ = cost.hop_seconds(gpu, host_dev)
        link = min(host_dev.link_bandwidth_bytes_per_s, gpu.link_bandwidth_bytes_per_s) * LINK_EFFICIENCY
        pre = ex.weights_bytes / link + cost.execute_seconds(ex, gpu)[1]   # prefill: copied to the GPU, run there
        st.decode_seconds += dec + 2 * hd
        st.prefill_seconds += pre
        extra_dec += dec + 2 * hd
        extra_pre += pre
        copy_room[st.device] = max(copy_room.get(st.device, 0), ex.weights_bytes)
        b = profile.blocks[i]
        sub.blocks[i] = replace(sub.blocks[i], experts_device=host_dev.id, experts_bytes=b.experts_bytes,
                                experts_module=modules[i])
    for st in sub.stages:   # planned with room kept on the GPUs for the prefill copy: their real capacity
        st.capacity_bytes = by_id[st.device].free_bytes if st.device in by_id else st.capacity_bytes
    for dev_id, nbytes in copy_room.items():   # the prefill copy: workspace of the device's first stage
        first = next(s for s in sub.stages if s.device == dev_id)
        first.activation_bytes += nbytes
    p = sub.predicted
    chunk = workload.chunk_tokens
    total_dec = p.decode_ms_per_step / 1e3 + extra_dec
    total_pre = chunk / max(p.prefill_tokens_per_s, 1e-9) + extra_pre
    if workload.objective == "throughput" and len(sub.stages) > 1:
        decode_tps = workload.batch / max(s.decode_seconds for s in sub.stages)
        prefill_tps = chunk / max(s.prefill_seconds for s in sub.stages)
    else:
        decode_tps, prefill_tps = workload.batch / total_dec, chunk / total_pre
    sub.predicted = Prediction(decode_tokens_per_s=round(decode_tps, 3), prefill_tokens_per_s=round(prefill_tps, 1),
                               decode_ms_per_step=round(total_dec * 1e3, 3),
                               bottleneck_stage=max(range(len(sub.stages)), key=lambda s: sub.stages[s].decode_seconds))
    sub.devices = list(devices)
    n_cpu_moe, ot = llama_cpp_moe_flags(profile, moved)
    sub.exports.pop("vllm_pp_layer_partition", None)   # vLLM's pipeline stages hold whole layers
    if "llama_cpp" in sub.exports:
        sub.exports["llama_cpp"] += " " + n_cpu_moe
        sub.exports["llama_cpp_ot"] = ot
    experts = sum(profile.blocks[i].experts_bytes for i in moved)
    first, last = moved[0] - 1, moved[-1] - 1
    off = sum(s.num_blocks for s in baseline.offloaded)
    sub.notes.append(
        f"MoE: the routed experts of layers {first}-{last} ({format_bytes(experts)}) stay in host RAM "
        f"({host_dev.id}) and run on the CPU for decode (copied to the GPU for a prefill); attention, router "
        f"and shared experts of every layer run on "
        f"the GPUs (instead of {off} whole blocks off the GPUs: "
        f"{baseline.predicted.decode_tokens_per_s:g} tokens/s decode, "
        f"{baseline.predicted.prefill_tokens_per_s:g} tokens/s prefill)")
    return sub
