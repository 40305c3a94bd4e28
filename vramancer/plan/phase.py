"""Offloaded layers run where each phase is fastest (issue 10 item 4), as llama.cpp does with the
layers it keeps in host RAM: decode (a few tokens per forward, memory-bound) computes them on the CPU
where their weights are; prefill (hundreds of tokens, compute-bound) streams their weights to a GPU
and computes there. A stage run this way has mode "phase" (``Stage``; the runtime switches per forward
on the number of tokens, ``PHASE_PREFILL_TOKENS``).

``phased(streamed, ...)`` takes the planner's streamed plan (its placement keeps room on the GPU for
the stream buffer) and turns each host-RAM stage whose blocks decode sooner on the host than streamed
into a phase stage: its decode time becomes the host's, its prefill time stays the GPU's. The planner
keeps it when it serves the representative request (``planner.request_seconds``) sooner than the
plan it has, even when the buffer pushes a few more blocks off the GPUs: the request's time decides.
"""
from __future__ import annotations

import copy

from ..devices.device import Device
from ..models.profile import ModelProfile
from .cost import CostModel
from .plan import Plan, Prediction, Workload

__all__ = ["phased", "phase_note"]


def phased(streamed: Plan, profile: ModelProfile, devices: list[Device], workload: Workload) -> Plan | None:
    """``streamed`` with its streamed host-RAM stages in mode "phase" where decoding them on the host
    is faster than streaming them; None when no stage is."""
    cost = CostModel(profile, workload.context, workload.batch, workload.prefill_chunk)
    by_id = {d.id: d for d in devices}
    out = copy.deepcopy(streamed)
    saved = 0.0
    for st in out.stages:
        host = by_id.get(st.device)
        if st.mode != "stream" or st.kind != "cpu" or host is None:
            continue
        dec = sum(cost.execute_seconds(profile.blocks[b], host)[0] for b in range(*st.blocks))
        if dec < st.decode_seconds:
            saved += st.decode_seconds - dec
            st.decode_seconds = dec
            st.mode = "phase"
    if saved <= 0.0:
        return None
    p = out.predicted
    total_dec = max(1e-12, p.decode_ms_per_step / 1e3 - saved)
    if workload.objective == "throughput" and len(out.stages) > 1:
        decode_tps = workload.batch / max(s.decode_seconds for s in out.stages)
    else:
        decode_tps = workload.batch / total_dec
    out.predicted = Prediction(decode_tokens_per_s=round(decode_tps, 3), prefill_tokens_per_s=p.prefill_tokens_per_s,
                               decode_ms_per_step=round(total_dec * 1e3, 3),
                               bottleneck_stage=max(range(len(out.stages)), key=lambda i: out.stages[i].decode_seconds))
    out.notes = [n.replace("(stream)", "(phase)") for n in out.notes]
    return out


def phase_note(chosen: Plan, other: Plan, other_name: str, gain: float) -> str:
    """The note a phase plan carries: where each phase runs and what it beat."""
    ph = [s for s in chosen.stages if s.mode == "phase"]
    blocks = sum(s.num_blocks for s in ph)
    hosts = ", ".join(dict.fromkeys(s.device for s in ph))
    gpus = ", ".join(dict.fromkeys(s.compute_device or "" for s in ph))
    p, o = chosen.predicted, other.predicted
    return (f"the {blocks} offloaded blocks run per phase: decode on {hosts} where their weights are "
            f"({p.decode_tokens_per_s:g} tokens/s), prefill streamed to {gpus} ({p.prefill_tokens_per_s:g} "
            f"tokens/s); a request is served {gain:.1f}x sooner than {other_name} "
            f"({o.decode_tokens_per_s:g} tokens/s decode, {o.prefill_tokens_per_s:g} prefill)")
