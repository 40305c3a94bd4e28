"""What a plan means to the person reading it: the stage order as a path and why, devices given but
left unused and why, and what the plan predicts on the real device behind simulated GPUs.

    pipeline_path(plan)                 # "rtx3060-12gb#0 -> rtx3090#0 -> cpu -> rtx3090#0"
    backing_prediction(plan, profile)   # the same blocks timed on the CPU that runs the simulated cards
    run_predictions(plan, profile, prompt_tokens=22, new_tokens=32)   # for the workload a run measured

Predictions are the planner's own (``plan_placement`` of the plan's blocks), never a second model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..devices.device import Device
from ..models.profile import ModelProfile
from ..units import GiB
from .advice import shortfall_by_device
from .plan import Plan, Prediction, Workload
from .planner import plan_placement, plan_profile, planning

__all__ = ["pipeline_path", "pipeline_why", "repeated_devices", "BackingPrediction", "backing_prediction",
           "run_predictions", "run_workload", "RunPredictions", "unused_devices", "PlanStory", "plan_story"]


def pipeline_path(plan: Plan) -> str:
    """Stage devices in the order hidden states flow: "rtx3060-12gb#0 -> rtx3090#0 -> cpu -> rtx3090#0"."""
    return " -> ".join(s.device for s in plan.stages)


def repeated_devices(plan: Plan) -> dict[str, list[int]]:
    """Devices that hold more than one stage: {device: [stage indices]}."""
    seen: dict[str, list[int]] = {}
    for i, s in enumerate(plan.stages):
        seen.setdefault(s.device, []).append(i)
    return {d: idx for d, idx in seen.items() if len(idx) > 1}


def pipeline_why(plan: Plan) -> str:
    """Why the stages run in this order, in one clause."""
    reasons = []
    gpu_stages = [s for s in plan.stages if s.kind == "gpu"]
    if plan.manual_split:
        reasons.append("--split proportions, over the GPUs in the order given")
    elif len({s.device for s in gpu_stages}) > 1:
        reasons.append("the cost model orders the GPUs for the " + (
            "least time per token (faster cards take more blocks)" if plan.workload.objective == "latency"
            else "most tokens/s with many streams (the slowest stage sets the pace)"))
    off = [s for s in plan.stages if s.kind != "gpu"]
    if off and gpu_stages:
        tiers = list(dict.fromkeys(s.device for s in off))
        reasons.append(f"{' and '.join(tiers)} hold{'s' if len(tiers) == 1 else ''} the "
                       f"{sum(s.num_blocks for s in off)} blocks the GPUs cannot")
    for dev, idx in repeated_devices(plan).items():
        if plan.stages[idx[-1]].blocks[1] == len(plan.blocks):
            before = plan.stages[idx[-1] - 1].device
            reasons.append(f"the head comes back to {dev}: the final norm, LM head and logits run faster there "
                           f"than on {before}")
        else:
            reasons.append(f"{dev} runs stages {', '.join(str(i) for i in idx)}")
    return "; ".join(reasons)


@dataclass(frozen=True)
class BackingPrediction:
    """What the plan predicts on ``device``, the real device that runs the simulated ``simulated``."""

    device: str
    simulated: tuple[str, ...]
    predicted: Prediction


def _backing_device(plan: Plan) -> tuple[Device, tuple[str, ...]] | None:
    from ..devices.spec import parse_devices

    sim = tuple(d.id for d in plan.devices if d.simulated and d.kind == "gpu"
                and any(s.device == d.id for s in plan.stages))
    if not sim:
        return None
    torch_devices = {s.torch_device for s in plan.stages if s.device in sim}
    if len(torch_devices) != 1:
        return None
    (td,) = torch_devices
    try:
        return parse_devices(td)[0], sim
    except Exception:  # noqa: BLE001 - a prediction line must never break the plan
        return None


def _all_on(plan: Plan, profile: ModelProfile, dev: Device, workload: Workload) -> Prediction:
    roomy = replace(dev, free_bytes=max(dev.free_bytes, 1 << 60), total_bytes=max(dev.total_bytes, 1 << 60))
    return plan_placement(profile, [roomy], workload, [roomy.id] * len(plan.blocks), offload_mode="execute").predicted


def backing_prediction(plan: Plan, profile: ModelProfile, workload: Workload | None = None) -> BackingPrediction | None:
    """When the plan's GPUs are simulated: its blocks timed on the device that really runs them
    (the CPU, or the ``--backing`` GPU), for ``workload`` (default the plan's)."""
    found = _backing_device(plan)
    if found is None:
        return None
    dev, sim = found
    return BackingPrediction(dev.id, sim, _all_on(plan, profile, dev, workload or plan.workload))


@dataclass(frozen=True)
class RunPredictions:
    """Predictions for the workload a run measured: on the plan's devices, and on the backing device."""

    named: Prediction
    backing: BackingPrediction | None


def run_workload(plan: Plan, prompt_tokens: int, new_tokens: int) -> Workload:
    """The workload a run measured: a prefill of the prompt in one chunk, a context of prompt + new tokens."""
    ctx = max(1, prompt_tokens + new_tokens)
    return replace(plan.workload, context=ctx, prefill_chunk=max(1, min(prompt_tokens, plan.workload.prefill_chunk)))


def run_predictions(plan: Plan, profile: ModelProfile, prompt_tokens: int, new_tokens: int) -> RunPredictions:
    w = run_workload(plan, prompt_tokens, new_tokens)
    named = plan_placement(profile, plan.devices, w, [b.device for b in plan.blocks],
                           offload_mode=None).predicted
    return RunPredictions(named, backing_prediction(plan, profile, w))


def unused_devices(plan: Plan, profile: ModelProfile, reserve_bytes=None) -> list[str]:
    """One line per GPU given but holding no block, with why and what using it would predict."""
    used = {s.device for s in plan.stages}
    idle = [d for d in plan.devices if d.kind == "gpu" and d.id not in used]
    if not idle or plan.manual_split:
        return []
    gpus = [d for d in plan.devices if d.kind == "gpu"]
    holders = sorted(used)
    split = [max(1, round(d.free_bytes / GiB)) for d in gpus]
    g = math.gcd(*split)
    split = [x // g for x in split]          # memory proportions, smallest terms: 24,12 -> 2,1
    try:
        both = plan_profile(profile, plan.devices, plan.workload, reserve_bytes=reserve_bytes, split=split,
                            suggest=False)
        fits_both = not shortfall_by_device(both)
    except Exception:  # noqa: BLE001 - an explanation must never break the plan
        both, fits_both = None, False
    from .cost import CostModel

    w = plan.workload
    cost = CostModel(profile, w.context, w.batch, w.prefill_chunk)
    first = next(d for d in plan.devices if d.id == plan.stages[0].device)
    lines = []
    for d in idle:
        if plan.fits:
            hop_ms = cost.hop_seconds(first, d)[0] * 1e3
            why = (f"the whole model fits on {', '.join(holders)}, and another stage would add a hop "
                   f"({hop_ms:.2f} ms/token) and put blocks on a slower card")
        else:
            why = "the cost model found no faster placement using it"
        if both is not None and fits_both:
            why += (f" (--split {','.join(str(x) for x in split)} predicts "
                    f"{both.predicted.decode_tokens_per_s:.1f} tokens/s decode against "
                    f"{plan.predicted.decode_tokens_per_s:.1f} here)")
        lines.append(f"{d.id} unused: {why}; use --split or --objective throughput to use every card")
    return lines


@dataclass(frozen=True)
class PlanStory:
    """What render_plan says beyond the plan itself: advice when it does not fit, unused devices,
    and the prediction on the device behind simulated GPUs."""

    advice: tuple = ()
    unused: tuple[str, ...] = ()
    backing: BackingPrediction | None = None


def plan_story(plan: Plan, profile: ModelProfile, reserve_bytes=None, devices_spec: str | None = None,
               backing: str = "cpu") -> PlanStory:
    from .advice import advise

    advice: tuple = ()
    if not plan.fits:
        advice = tuple(advise(planning(), profile, list(plan.devices), plan.workload, reserve_bytes=reserve_bytes,
                              split=plan.manual_split, devices_spec=devices_spec, backing=backing))
    return PlanStory(advice=advice, unused=tuple(unused_devices(plan, profile, reserve_bytes)),
                     backing=backing_prediction(plan, profile))
