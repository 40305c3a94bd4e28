"""When a model does not fit: the closest placement there is, what is short where, and what a
llama.cpp user would try first, each with its figures and each checked by planning again with it.
The one place advice is made: ``plan`` (the API: ``Plan.suggestions``, a DoesNotFitError's message)
and ``vramancer plan`` (its table and ``--json`` "advice") both show what ``advise`` returns.

    partial = partial_plan(planning(), profile, devices, workload)   # a Plan, fits=False, shortfall_bytes > 0
    for a in advise(planning(), profile, devices, workload, devices_spec="rtx3060"):
        print(a.text)            # "--devices rtx3060,cpu: fits, 9 of 34 blocks off the GPUs, 3.1 tokens/s decode"

The closest placement: one device at a time is given room without limit but made the slowest, so
the planner fills every other device first and puts only the rest on it; that placement is then
judged on the real devices (``plan_placement``) and the one short by the fewest bytes is kept
(host tiers tried first: that is where llama.cpp puts what the GPUs cannot hold).

Advice, in the order people try it: add ``cpu`` (then ``disk``) to ``--devices``; a ``--split`` that
fits (for a manual split); the largest ``--context`` that fits; the first smaller ``--dtype`` that
fits; when there are GPUs, the smallest catalog GPU that, added to ``--devices``, holds the rest.
Each is searched with ``placement_exists`` and then planned in full, so its figures (tokens/s,
blocks off the GPUs) are the plan's own. There is no KV-cache dtype option to advise. Without a
GPU in the devices a plan that fits is no failure: no advice, and never "more GPU memory".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from ..devices.device import Device
from ..errors import DoesNotFitError
from ..models.profile import ModelProfile
from ..units import format_bytes
from .plan import Plan, Workload

__all__ = ["Advice", "Planning", "partial_plan", "advise", "shortfall_by_device", "MIN_USEFUL_CONTEXT",
           "MAX_GPU_CANDIDATES"]

# a context shorter than this is not worth suggesting
MIN_USEFUL_CONTEXT = 256
# catalog GPUs tried (smallest memory first, from the first large enough) for "add a GPU"
MAX_GPU_CANDIDATES = 4
_UNLIMITED = 1 << 60
_SLOWER = 0.5       # the device given room without limit is made this much slower than the slowest: it takes the rest


@dataclass(frozen=True)
class Planning:
    """The planner's entry points advice plans with (``plan.planner.planning()`` gives them: the
    planner asks this module for the advice on a plan it made, so this module does not import it)."""

    plan_profile: Callable[..., Plan]
    plan_placement: Callable[..., Plan]
    placement_exists: Callable[..., bool]
    smaller_dtypes: tuple[str, ...]


@dataclass(frozen=True)
class Advice:
    """One change to try: ``flag`` and ``value`` as typed on the command line; ``fits_on_gpus``:
    the model then fits the GPUs alone (else it runs partly from host RAM or disk); the figures are
    those of the plan made with the change."""

    flag: str
    value: str
    fits_on_gpus: bool
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    blocks_off_gpus: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def shortfall_by_device(plan: Plan) -> dict[str, int]:
    """Bytes each device of ``plan`` lacks (only devices that lack some)."""
    used = plan.device_used_bytes()
    cap = {d.id: d.free_bytes for d in plan.devices}
    for s in plan.stages:
        cap.setdefault(s.device, s.capacity_bytes)
    return {dev: n - cap[dev] for dev, n in used.items() if n > cap.get(dev, n)}


def _overflow_order(devices: list[Device]) -> list[int]:
    rank = {"disk": 0, "cpu": 1, "gpu": 2}
    return sorted(range(len(devices)), key=lambda i: (rank.get(devices[i].kind, 3), -devices[i].free_bytes))


def partial_plan(planning: Planning, profile: ModelProfile, devices: list[Device], workload: Workload,
                 reserve_bytes: int | str | None = None) -> Plan:
    """The placement that comes closest to fitting (fewest bytes short), as a Plan on the real
    devices: ``fits`` False, ``shortfall_bytes`` what is missing, the stages that overflow marked by
    negative free room."""
    best: Plan | None = None
    slowest_bw = min(d.bandwidth_bytes_per_s for d in devices)
    slowest_tf = min((d.tflops for d in devices if d.tflops > 0), default=0.05)
    for i in _overflow_order(devices):
        d = devices[i]
        roomy = replace(d, free_bytes=_UNLIMITED, total_bytes=_UNLIMITED,
                        bandwidth_bytes_per_s=slowest_bw * _SLOWER, tflops=slowest_tf * _SLOWER)
        trial = devices[:i] + [roomy] + devices[i + 1:]
        try:
            p = planning.plan_profile(profile, trial, workload, reserve_bytes=reserve_bytes, suggest=False)
        except (DoesNotFitError, ZeroDivisionError):
            continue
        real = planning.plan_placement(profile, devices, workload, [b.device for b in p.blocks],
                                       reserve_bytes=reserve_bytes)
        if best is None or real.shortfall_bytes < best.shortfall_bytes:
            best = real
    if best is None:  # pragma: no cover - a device without limit always holds the model
        raise DoesNotFitError(f"{profile.name}: no placement at all")
    return best


def _figures(p: Plan) -> tuple[float, float, int]:
    return (p.predicted.decode_tokens_per_s, p.predicted.prefill_tokens_per_s,
            sum(s.num_blocks for s in p.offloaded))


def _tps(x: float) -> str:
    if x < 1:
        return f"{x:.2g}"
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _outcome(p: Plan) -> str:
    dec, _, off = _figures(p)
    n = len(p.blocks)
    where = "on the GPUs" if p.fits else (f"{off} of {n} blocks off the GPUs" if any(
        d.kind == "gpu" for d in p.devices) else "")
    return f"fits{' ' + where if where else ''}, {_tps(dec)} tokens/s decode"


def _try(planning: Planning, profile: ModelProfile, devices: list[Device], workload: Workload, reserve_bytes,
         split: list[float] | None, need_gpus: bool) -> Plan | None:
    """The full plan when it fits (on the GPUs alone with ``need_gpus``), else None."""
    try:
        p = planning.plan_profile(profile, devices, workload, reserve_bytes=reserve_bytes, split=split, suggest=False)
    except DoesNotFitError:
        return None
    if shortfall_by_device(p) or (need_gpus and not p.fits):
        return None
    return p


def _advice(flag: str, value: str, p: Plan, why: str = "") -> Advice:
    dec, pre, off = _figures(p)
    return Advice(flag=flag, value=value, fits_on_gpus=p.fits, decode_tokens_per_s=dec, prefill_tokens_per_s=pre,
                  blocks_off_gpus=off, text=f"{flag} {value}: {why}{_outcome(p)}")


def _largest_context(planning: Planning, profile, devices, workload, reserve_bytes, split, need_gpus) -> Plan | None:
    lo, hi = 0, workload.context
    while hi - lo > 1:
        mid = (lo + hi) // 2
        w = replace(workload, context=mid)
        ok = (planning.placement_exists(profile, devices, w, reserve_bytes, gpu_only=need_gpus) if split is None
              else _try(planning, profile, devices, w, reserve_bytes, split, need_gpus) is not None)
        if ok:
            lo = mid
        else:
            hi = mid
    # the search is the planner's own; the full plan at the answer confirms it (and gives the figures)
    while lo >= min(MIN_USEFUL_CONTEXT, workload.context // 2) and lo > 0:
        p = _try(planning, profile, devices, replace(workload, context=lo), reserve_bytes, split, need_gpus)
        if p is not None:
            return p
        lo = lo * 15 // 16
    return None


def _spec_item(d: Device) -> str:
    """``d`` as a --devices item: a catalog key (with its memory when overridden), a real id, or a tier."""
    if d.simulated and d.kind == "gpu" and d.catalog_key:
        from ..devices.catalog import find_gpu

        spec = find_gpu(d.catalog_key)
        same = spec is not None and spec.memory_bytes == d.free_bytes
        return d.catalog_key if same else f"{d.catalog_key}:{d.free_bytes}"
    return d.kind if d.kind in ("cpu", "disk") and not d.simulated else d.id


def _with_extra(devices: list[Device], item: str, backing: str) -> list[Device]:
    """``devices`` and those of the spec ``item``, simulated GPUs numbered after those already there."""
    from ..devices.spec import parse_devices

    taken = {d.id for d in devices}
    out = list(devices)
    for d in parse_devices(item, backing=backing):
        base, n = d.id.split("#")[0], 0
        while d.id in taken:
            d = replace(d, id=f"{base}#{n}")
            n += 1
        taken.add(d.id)
        out.append(d)
    return out


def _gpu_short_bytes(current: Plan | None, fits_nowhere_short: int) -> int:
    if current is None:
        return fits_nowhere_short
    return max(sum(shortfall_by_device(current).values()), current.shortfall_bytes)


def _another_gpu(planning: Planning, profile, devices, workload, reserve_bytes, short_bytes: int, spec: str,
                 backing: str, need_gpus: bool) -> Advice | None:
    """The smallest catalog GPU (of the vendor of the GPUs given) that, added, lets the model fit
    (on the GPUs alone when ``need_gpus``)."""
    from ..devices.catalog import list_gpus

    vendors = {d.vendor for d in devices if d.kind == "gpu" and d.vendor}
    cands = sorted((g for g in list_gpus() if not g.unified_memory and g.memory_bytes >= short_bytes
                    and (not vendors or g.vendor in vendors)), key=lambda g: (g.memory_bytes, -g.bandwidth_bytes_per_s))
    seen: set[int] = set()
    for g in cands:
        if g.memory_bytes in seen:       # one card per memory size: the fastest of that size
            continue
        seen.add(g.memory_bytes)
        if len(seen) > MAX_GPU_CANDIDATES:
            break
        more = _with_extra(devices, g.key, backing)
        if not planning.placement_exists(profile, more, workload, reserve_bytes, gpu_only=need_gpus):
            continue
        p = _try(planning, profile, more, workload, reserve_bytes, None, need_gpus)
        if p is not None:
            return _advice("--devices", f"{spec},{g.key}", p, f"another GPU ({format_bytes(g.memory_bytes, 0)}), ")
    return None


def advise(planning: Planning, profile: ModelProfile, devices: list[Device], workload: Workload, reserve_bytes=None,
           split: list[float] | None = None, devices_spec: str | None = None,
           backing: str = "cpu", current: Plan | None = None, fits_nowhere: bool = False,
           shortfall_bytes: int = 0) -> list[Advice]:
    """What would make the model fit: on the devices at all when it does not (or a manual split
    overflows), on the GPUs alone when it runs partly offloaded. Empty when it fits the GPUs, or
    when there is no GPU to fit (a CPU-only plan is not a failure). ``current``: the plan already
    made on ``devices`` (else it is planned here); ``fits_nowhere``: the planner already found no
    placement at all, ``shortfall_bytes`` short."""
    gpus = [d for d in devices if d.kind == "gpu"]
    if fits_nowhere:
        current, short = None, True
    else:
        if current is None:
            try:
                current = planning.plan_profile(profile, devices, workload, reserve_bytes=reserve_bytes, split=split,
                                       suggest=False)
            except DoesNotFitError as e:
                current, shortfall_bytes = None, e.shortfall_bytes
        short = current is None or bool(shortfall_by_device(current))
        if split is None and current is not None:
            split = current.manual_split
    if not short and (current is None or current.fits or not gpus):
        return []
    need_gpus = not short            # offloaded: advise what fits the GPUs alone
    out: list[Advice] = []
    kinds = {d.kind for d in devices}
    spec = devices_spec if devices_spec and devices_spec != "auto" else ",".join(_spec_item(d) for d in devices)
    if short:
        for extra in ("cpu", "disk"):
            if extra in kinds:
                continue
            item = extra if extra == "cpu" or "cpu" in kinds else "cpu,disk"
            p = _try(planning, profile, _with_extra(devices, item, backing), workload, reserve_bytes, split, False)
            if p is not None:
                out.append(_advice("--devices", f"{spec},{item}", p))
                break
    if split is not None and short and len(gpus) >= 2:
        p = _try(planning, profile, devices, workload, reserve_bytes, None, False)
        if p is not None:
            layers = {d.id: 0 for d in gpus}
            for b in p.blocks:
                if b.layer_index is not None and b.device in layers:
                    layers[b.device] += 1
            if sum(layers.values()):
                value = ",".join(str(layers[d.id]) for d in gpus)
                even = [float(layers[d.id]) for d in gpus]
                p2 = _try(planning, profile, devices, workload, reserve_bytes, even, False)
                if p2 is not None:
                    out.append(_advice("--split", value, p2, "the planner's split, "))
    p = _largest_context(planning, profile, devices if not need_gpus else gpus, workload, reserve_bytes,
                         split, need_gpus) if (gpus or not need_gpus) else None
    if p is not None and p.workload.context < workload.context:
        out.append(_advice("--context", str(p.workload.context), p))
    if profile.config is not None and profile.source in ("catalog", "hf-folder", "hf-cache", "config"):
        from ..models.dtypes import resolve_dtype
        from ..models.resolve import profile as make_profile

        bits = resolve_dtype(profile.dtype).bits_per_weight
        for name in planning.smaller_dtypes:
            if resolve_dtype(name).bits_per_weight >= bits:
                continue
            try:
                other = make_profile(profile.path or profile.name, dtype=name)
            except Exception:  # noqa: BLE001 - advice must never break the plan
                break
            w = replace(workload, dtype=other.dtype)
            if not planning.placement_exists(other, devices, w, reserve_bytes, gpu_only=need_gpus):
                continue
            p = _try(planning, other, devices, w, reserve_bytes, split, need_gpus)
            if p is not None:
                weights = sum(st.weights_bytes for st in p.stages)
                out.append(_advice("--dtype", name, p, f"weights {format_bytes(weights)}, "))
                break
    if gpus and split is None:
        gpu_short = _gpu_short_bytes(current, shortfall_bytes)
        a = _another_gpu(planning, profile, devices, workload, reserve_bytes, gpu_short, spec, backing, need_gpus)
        if a is not None:
            out.append(a)
    return out
