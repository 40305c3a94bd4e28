"""plan_pipeline(profile, devices, workload) -> Plan for an image pipeline, phase by phase.

Phases: encode (text encoders), ``steps`` x denoise (the denoiser), decode (the VAE). The denoiser
is placed first, by the LLM planner (``plan_profile``: its blocks as contiguous stages over the GPUs,
offloaded stages executed on the host or streamed), for one denoising forward: ``denoise_tokens``
tokens of ``denoise_batch`` images (CFG doubles the batch). Each other component, in turn, then
takes the cheapest of (seconds per image):

    resident  on a GPU that holds it in every phase next to what stays there:       no extra cost
    moved     kept in host RAM, copied onto a GPU for its phase and dropped after:  weights / link
    cpu       kept and run on the host:                                             its FLOPs on the CPU

Memory per device and phase = reserve + every resident weight (the denoiser's stages, resident
components) + in its phase the running component's weights (moved) and workspace (the denoiser's
stage workspace and stream buffer only in the denoise phase). A component "moved" in leaves before
the next phase, so phases never hold two moved components.

FLOPs: text encoder 2 x params x tokens per prompt (x2 with CFG); VAE decode 2 x params x latent
positions x 2 (its upper levels run at 2x-8x the latent resolution with fewer channels; an estimate);
a GPU reaches COMPUTE_EFFICIENCY of its peak, the host its measured GEMM rate (host_speed).

The same memory and speed model judges other tools' placements (``policy``): "balanced" is
diffusers' ``device_map="balanced"`` (whole components per GPU, none moved); "model_cpu_offload"
is ``enable_model_cpu_offload`` (all on the first GPU, each component moved in for its phase).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from ..devices.device import Device
from ..devices.host_speed import host_speed
from ..errors import DoesNotFitError, WorkloadError
from ..models.pipeline import PHASES, ComponentProfile, ImageWorkload, PipelineProfile
from ..units import format_bytes
from .cost import COMPUTE_EFFICIENCY, LINK_EFFICIENCY
from .memory import default_reserve_bytes
from .plan import ComponentPlacement, ImagePrediction, PhasePeak, Plan, Workload
from .planner import plan_placement, plan_profile

__all__ = ["plan_pipeline", "Policy", "POLICIES", "denoiser_workload", "pipeline_suggestions", "render_pipeline_plan",
           "plan_command", "add_image_flags"]

Policy = Literal["vramancer", "balanced", "model_cpu_offload"]
POLICIES: tuple[str, ...] = ("vramancer", "balanced", "model_cpu_offload")
_HOST = "cpu"


def denoiser_workload(profile: PipelineProfile, w: ImageWorkload) -> Workload:
    """One denoising forward as the LLM planner's workload: the whole sequence in one chunk."""
    tokens = profile.denoise_tokens(w)
    return Workload(context=tokens, batch=w.denoise_batch, dtype=profile.denoiser.dtype, objective="latency",
                    prefill_chunk=tokens)


def _flops(profile: PipelineProfile, c: ComponentProfile, w: ImageWorkload) -> float:
    if c.role == "vae":
        pos = (w.height // profile.vae_scale) * (w.width // profile.vae_scale)
        return 2.0 * c.params * pos * 2 * w.batch
    n = w.batch * (2 if w.cfg_doubles and w.guidance > 1.0 else 1)
    return 2.0 * c.params * max(c.tokens, 1) * n


def _compute_seconds(flops: float, dev: Device | None) -> float:
    if dev is None or dev.kind != "gpu":
        return flops / host_speed().gemm_flops_per_s
    return flops / (max(dev.tflops, 0.05) * 1e12 * COMPUTE_EFFICIENCY)


def _move_seconds(nbytes: int, dev: Device) -> float:
    return nbytes / (dev.link_bandwidth_bytes_per_s * LINK_EFFICIENCY)


@dataclass
class _Budget:
    """What each device holds in each phase so far (reserve included), and its capacity."""

    capacity: dict[str, int]
    used: dict[str, dict[str, int]]

    def add(self, dev: str, nbytes: int, phases: tuple[str, ...]) -> None:
        for ph in phases:
            self.used[ph][dev] = self.used[ph].get(dev, 0) + nbytes

    def fits(self, dev: str, nbytes_by_phase: dict[str, int]) -> bool:
        return all(self.used[ph].get(dev, 0) + n <= self.capacity[dev] for ph, n in nbytes_by_phase.items())

    def room(self, dev: str, phase: str) -> int:
        return self.capacity[dev] - self.used[phase].get(dev, 0)


def _denoiser_plan(profile: PipelineProfile, devices: list[Device], w: ImageWorkload, policy: str,
                   reserve_bytes: int | str | None, block_devices: list[str] | None = None,
                   offload_mode: str | None = None) -> Plan:
    den = profile.denoiser
    wl = denoiser_workload(profile, w)
    if profile.dequant_bytes:
        # a GGUF denoiser: room left for its dequantized layer where blocks run, and offloaded blocks
        # executed in host RAM (streaming copies plain tensors: diffusers' GGUF layers need theirs)
        if offload_mode == "stream":
            raise WorkloadError(f"{profile.name}: a GGUF denoiser's offloaded blocks run in host RAM (execute); "
                                "streaming them to a GPU is not supported")
        devices = [replace(d, free_bytes=max(0, d.free_bytes - profile.dequant_bytes)) if d.kind != "disk" else d
                   for d in devices]
        offload_mode = "execute"
    plan = _denoiser_placement(den, devices, wl, policy, reserve_bytes, block_devices, offload_mode)
    if offload_mode == "execute" and any(s.mode == "stream" for s in plan.stages):
        ids = [s.device for s in plan.stages for _ in range(*s.blocks)]
        plan = plan_placement(den, devices, wl, ids, offload_mode="execute", reserve_bytes=reserve_bytes)
    return plan


def _denoiser_placement(den, devices: list[Device], wl: Workload, policy: str, reserve_bytes: int | str | None,
                        block_devices: list[str] | None, offload_mode: str | None) -> Plan:
    gpus = [d for d in devices if d.kind == "gpu"]
    if block_devices is not None:
        return plan_placement(den, devices, wl, list(block_devices), offload_mode=offload_mode,
                              reserve_bytes=reserve_bytes)
    if policy == "vramancer" or not gpus:
        return plan_profile(den, devices, wl, reserve_bytes=reserve_bytes, suggest=False)
    if policy == "model_cpu_offload":
        target = gpus[0]
    else:   # balanced: the denoiser whole on the GPU with the most free memory
        target = max(gpus, key=lambda d: d.free_bytes)
    return plan_placement(den, devices, wl, [target.id] * den.num_blocks, reserve_bytes=reserve_bytes)


def plan_pipeline(profile: PipelineProfile, devices: list[Device], workload: ImageWorkload,
                  reserve_bytes: int | str | None = None, policy: str = "vramancer", suggest: bool = True,
                  block_devices: list[str] | None = None, offload_mode: str | None = None) -> Plan:
    """The phase-aware Plan of ``profile`` on ``devices``; DoesNotFitError (exit 3) with suggestions
    (smaller image, smaller batch, 8-bit denoiser) when no placement fits; WorkloadError (exit 2)
    for a size the VAE cannot take. ``block_devices`` (a device id per denoiser block) and
    ``offload_mode`` ("stream" / "execute") fix the denoiser's placement instead of searching it."""
    if policy not in POLICIES:
        raise WorkloadError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    profile.check_size(workload)
    if policy == "vramancer" and block_devices is None:
        # the partitioner's split of the denoiser, and the denoiser whole on each GPU: the plan that
        # fits with the fewest seconds per image (a split costs hops; whole, it may crowd the encoders out)
        best = _plan_one(profile, devices, workload, reserve_bytes, policy, suggest, None, offload_mode)
        for g in (d for d in devices if d.kind == "gpu"):
            try:
                alt = _plan_one(profile, devices, workload, reserve_bytes, policy, False,
                                [g.id] * profile.denoiser.num_blocks, None)
            except DoesNotFitError:
                continue
            if alt.fits and (not best.fits or alt.image.seconds_per_image < best.image.seconds_per_image):
                best = alt
        return best
    return _plan_one(profile, devices, workload, reserve_bytes, policy, suggest, block_devices, offload_mode)


def _plan_one(profile: PipelineProfile, devices: list[Device], workload: ImageWorkload,
              reserve_bytes: int | str | None, policy: str, suggest: bool, block_devices: list[str] | None,
              offload_mode: str | None) -> Plan:
    reserve = {d.id: (default_reserve_bytes(d) if reserve_bytes is None else int(reserve_bytes)) for d in devices}
    try:
        den_plan = _denoiser_plan(profile, devices, workload, policy, reserve_bytes, block_devices, offload_mode)
    except DoesNotFitError as e:
        sugg = pipeline_suggestions(profile, devices, workload, reserve_bytes, policy) if suggest else []
        raise DoesNotFitError(f"{profile.name}: the denoiser does not fit on {', '.join(d.id for d in devices)} "
                              f"at {workload.width}x{workload.height}, batch {workload.batch}: "
                              f"{format_bytes(e.shortfall_bytes)} short"
                              + (f"; to fit: {'; or '.join(sugg)}" if sugg else ""),
                              shortfall_bytes=e.shortfall_bytes, suggestions=sugg) from None
    by_id = {d.id: d for d in devices}
    gpus = [d for d in devices if d.kind == "gpu"]
    budget = _Budget({d.id: d.free_bytes for d in devices}, {ph: {} for ph in PHASES})
    for d in devices:
        budget.add(d.id, reserve[d.id], PHASES)
    # the denoiser: its weights stay in every phase (model_cpu_offload: only while it runs); workspace
    # and stream buffers while it runs
    for st in den_plan.stages:
        budget.add(st.device, st.weights_bytes, ("denoise",) if policy == "model_cpu_offload" else PHASES)
        budget.add(st.device, st.activation_bytes, ("denoise",))
    for buf in den_plan.stream_buffers:
        if buf.device in by_id:
            budget.add(buf.device, buf.buffer_bytes, ("denoise",))
    # a quantized (GGUF) denoiser: each device that runs its blocks holds one layer dequantized at a time
    for dev in dict.fromkeys(st.compute_device or st.device for st in den_plan.stages if st.kind != "disk"):
        if profile.dequant_bytes and dev in by_id:
            budget.add(dev, profile.dequant_bytes, ("denoise",))
    den = profile.denoiser_component
    wl = denoiser_workload(profile, workload)
    step_seconds = wl.prefill_chunk * wl.batch / max(den_plan.predicted.prefill_tokens_per_s, 1e-12)
    placements: list[ComponentPlacement] = []
    stage_devs = list(dict.fromkeys(s.device for s in den_plan.stages))
    den_dev = stage_devs[0] if len(stage_devs) == 1 else ",".join(stage_devs)
    placements.append(ComponentPlacement(
        name=den.name, role="denoiser", phase="denoise", mode="split" if len(stage_devs) > 1 else "resident",
        device=den_dev, weights_bytes=den.weights_bytes,
        activation_bytes=max((s.activation_bytes for s in den_plan.stages), default=0) + profile.dequant_bytes,
        compute_seconds=step_seconds * workload.steps / workload.batch))
    notes: list[str] = []
    evicted: dict[str, set[int]] = {}   # phase -> denoiser stages waiting in host RAM during it
    others = sorted((c for c in profile.components if c.role != "denoiser"),
                    key=lambda c: (PHASES.index(c.phase), -c.weights_bytes))
    # balanced: components largest first, each on the GPU with the most room left
    if policy == "balanced":
        others = sorted(others, key=lambda c: -c.weights_bytes)
    for c in others:
        act = profile.activation_bytes(c, workload)
        flops = _flops(profile, c, workload)
        options: list[tuple[float, int, ComponentPlacement]] = []
        for g in gpus:
            if policy == "model_cpu_offload" and g is not gpus[0]:
                continue
            need_res = {ph: c.weights_bytes + (act if ph == c.phase else 0) for ph in PHASES}
            comp_s = _compute_seconds(flops, g) / workload.batch
            if policy != "model_cpu_offload" and budget.fits(g.id, need_res):
                options.append((comp_s, 0, ComponentPlacement(c.name, c.role, c.phase, "resident", g.id,
                                                              c.weights_bytes, act, comp_s, 0.0)))
            if policy != "balanced" and budget.fits(g.id, {c.phase: c.weights_bytes + act}):
                mv = _move_seconds(c.weights_bytes, g) / workload.batch
                options.append((comp_s + mv, 1, ComponentPlacement(c.name, c.role, c.phase, "moved", g.id,
                                                                   c.weights_bytes, act, comp_s, mv)))
            elif policy == "vramancer":
                # moved in while the denoiser's executed stages on this GPU wait in host RAM (copied
                # back before the first denoising step: their bytes over the link, per image)
                ev = [i for i, st in enumerate(den_plan.stages)
                      if st.device == g.id and st.mode == "execute" and i not in evicted.get(c.phase, set())]
                freed = sum(den_plan.stages[i].weights_bytes for i in ev)
                if ev and budget.fits(g.id, {c.phase: c.weights_bytes + act - freed}):
                    mv = _move_seconds(c.weights_bytes + freed, g) / workload.batch
                    options.append((comp_s + mv, 1, ComponentPlacement(c.name, c.role, c.phase, "moved", g.id,
                                                                       c.weights_bytes, act, comp_s, mv,
                                                                       evicts=tuple(ev))))
        if policy == "vramancer" or not gpus:
            host = next((d for d in devices if d.kind == "cpu"), None)
            if host is None or budget.fits(host.id, {ph: c.weights_bytes + (act if ph == c.phase else 0)
                                                     for ph in PHASES}):
                comp_s = _compute_seconds(flops, None) / workload.batch
                options.append((comp_s, 2, ComponentPlacement(c.name, c.role, c.phase, "cpu",
                                                              host.id if host else _HOST, c.weights_bytes, act,
                                                              comp_s, 0.0)))
        if not options:
            short = c.weights_bytes + act - max((budget.room(g.id, c.phase) for g in gpus), default=0)
            sugg = pipeline_suggestions(profile, devices, workload, reserve_bytes, policy) if suggest else []
            raise DoesNotFitError(
                f"{profile.name}: {c.name} ({format_bytes(c.weights_bytes)} + {format_bytes(act)} workspace) fits on "
                f"no device next to the denoiser at {workload.width}x{workload.height}, batch {workload.batch}"
                + (f"; to fit: {'; or '.join(sugg)}" if sugg else ""), shortfall_bytes=max(short, 1),
                suggestions=sugg)
        if policy == "balanced":
            # whole components on the GPU with the most room (diffusers' balanced map), not the fastest
            options.sort(key=lambda o: -budget.room(o[2].device, c.phase))
        else:
            options.sort(key=lambda o: (o[0], o[1]))
        pick = options[0][2]
        placements.append(pick)
        if pick.mode == "resident":
            budget.add(pick.device, c.weights_bytes, PHASES)
            budget.add(pick.device, act, (c.phase,))
        elif pick.mode == "moved":
            budget.add(pick.device, c.weights_bytes + act, (c.phase,))
            for i in pick.evicts:
                budget.add(pick.device, -den_plan.stages[i].weights_bytes, (c.phase,))
                evicted.setdefault(c.phase, set()).add(i)
        elif pick.device in by_id:
            budget.add(pick.device, c.weights_bytes, PHASES)
            budget.add(pick.device, act, (c.phase,))
    if policy == "model_cpu_offload" and gpus:
        # the denoiser too is moved in once per image (and out when the VAE comes in)
        mv = _move_seconds(den.weights_bytes, gpus[0]) / workload.batch
        placements[0] = replace(placements[0], mode="moved", move_seconds=mv)
    peaks = [PhasePeak(ph, d.id, budget.used[ph].get(d.id, 0), d.free_bytes)
             for ph in PHASES for d in devices if budget.used[ph].get(d.id, 0) > reserve[d.id] or d.kind == "gpu"]
    enc = sum(p.compute_seconds for p in placements if p.phase == "encode")
    dec = sum(p.compute_seconds for p in placements if p.phase == "decode")
    moves = sum(p.move_seconds for p in placements)
    step_per_image = step_seconds / workload.batch
    total = enc + workload.steps * step_per_image + dec + moves
    image = ImagePrediction(height=workload.height, width=workload.width, batch=workload.batch, steps=workload.steps,
                            guidance=float(workload.guidance), encode_seconds=round(enc, 6),
                            step_seconds=round(step_per_image, 6), decode_seconds=round(dec, 6),
                            move_seconds=round(moves, 6), seconds_per_image=round(total, 6))
    over = [p for p in peaks if p.bytes > p.capacity_bytes]
    fits = den_plan.fits and not over
    for p in over:
        notes.append(f"{p.device} needs {format_bytes(p.bytes - p.capacity_bytes)} more in the {p.phase} phase")
    if profile.eager_attention:
        notes.append("attention scores counted (eager attention)")
    else:
        notes.append("attention scores not counted: diffusers' SDPA processors never hold them on CUDA")
    den_plan.components = placements
    den_plan.phase_peaks = peaks
    den_plan.image = image
    den_plan.model = profile.name
    den_plan.notes = list(profile.notes) + den_plan.notes + notes
    den_plan.fits = fits
    return den_plan


def _scaled_denoiser(profile: PipelineProfile, bits: int) -> PipelineProfile:
    """The profile with its denoiser's weights stored at ``bits`` per weight (8-bit: half of bf16)."""
    from ..models.dtypes import resolve_dtype

    cur = resolve_dtype(profile.denoiser.dtype).compute_bytes * 8

    def sc(n: int) -> int:
        return math.ceil(n * bits / cur)

    blocks = [replace(b, weights_bytes=sc(b.weights_bytes), read_bytes_per_token=sc(b.read_bytes_per_token))
              for b in profile.denoiser.blocks]
    den = replace(profile.denoiser, blocks=blocks)
    comps = [replace(c, weights_bytes=sc(c.weights_bytes)) if c.role == "denoiser" else c for c in profile.components]
    return replace(profile, denoiser=den, components=comps)


def pipeline_suggestions(profile: PipelineProfile, devices: list[Device], w: ImageWorkload,
                         reserve_bytes: int | str | None = None, policy: str = "vramancer") -> list[str]:
    """What would fit, each checked by planning it: a smaller image, a smaller batch, an 8-bit denoiser."""
    out: list[str] = []
    m = profile.pixel_multiple
    trials: list[tuple[str, PipelineProfile, ImageWorkload]] = []
    if w.height > m or w.width > m:
        h = max(m, w.height // 2 // m * m)
        wd = max(m, w.width // 2 // m * m)
        trials.append((f"--height {h} --width {wd}", profile, replace(w, height=h, width=wd)))
    if w.batch > 1:
        trials.append(("--batch 1", profile, replace(w, batch=1)))
    if profile.denoiser.dtype in ("float32", "float16", "bfloat16") and not profile.dequant_bytes:
        trials.append(("an 8-bit denoiser", _scaled_denoiser(profile, 8), w))
    for label, prof, wl in trials:
        try:
            p = plan_pipeline(prof, devices, wl, reserve_bytes, policy, suggest=False)
        except (DoesNotFitError, WorkloadError):
            continue
        if p.fits and p.image is not None:
            peak = max((x.bytes for x in p.phase_peaks), default=0)
            out.append(f"{label} ({p.image.seconds_per_image:.2f} s/image, peak {format_bytes(peak)} on one device)")
    return out


# -- the plan command for pipelines ------------------------------------------------------------------
def add_image_flags(p) -> None:
    """--height --width --steps --guidance (image pipelines; --batch is the planner's)."""
    p.add_argument("--height", type=int, default=1024, help="image pipelines: image height in pixels (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image pipelines: image width in pixels (default 1024)")
    p.add_argument("--steps", type=int, default=28, help="image pipelines: denoising steps (default 28)")
    p.add_argument("--guidance", type=float, default=3.5,
                   help="image pipelines: guidance scale; > 1 runs classifier-free guidance (default 3.5)")
    p.add_argument("--pipeline-config", metavar="DIR", default=None,
                   help="image pipelines: a local diffusers folder of the pipeline a single-file checkpoint "
                        "belongs to (its configs, nothing is downloaded; a GGUF denoiser also takes its text "
                        "encoders and VAE from there, planned from their weights)")


def render_pipeline_plan(plan: Plan, console) -> None:
    """Components, per-phase peaks per device, the denoiser's stages and the predicted seconds."""
    from rich.table import Table

    img = plan.image
    head = (f"{plan.model}  {img.width}x{img.height} · batch {img.batch} · {img.steps} steps · "
            f"guidance {img.guidance:g}") if img else plan.model
    console.print(head, markup=False, highlight=False)
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("component", "phase", "mode", "device", "weights", "workspace", "s/image"):
        t.add_column(col, justify="right" if col in ("weights", "workspace", "s/image") else "left")
    for c in plan.components:
        t.add_row(c.name, c.phase, c.mode, c.device, format_bytes(c.weights_bytes), format_bytes(c.activation_bytes),
                  f"{c.compute_seconds + c.move_seconds:.3f}")
    console.print(t)
    peaks = Table(box=None, pad_edge=False, header_style="bold", title="peak per phase", title_justify="left")
    peaks.add_column("device")
    for ph in PHASES:
        peaks.add_column(ph, justify="right")
    peaks.add_column("capacity", justify="right")
    devs = list(dict.fromkeys(p.device for p in plan.phase_peaks))
    for dev in devs:
        row = {p.phase: p for p in plan.phase_peaks if p.device == dev}
        cap = next(p.capacity_bytes for p in plan.phase_peaks if p.device == dev)
        cells = []
        for ph in PHASES:
            p = row.get(ph)
            cells.append("-" if p is None else format_bytes(p.bytes) + (" !" if p.bytes > p.capacity_bytes else ""))
        peaks.add_row(dev, *cells, format_bytes(cap))
    console.print(peaks)
    for i, s in enumerate(plan.stages):
        names = f"{plan.blocks[s.blocks[0]].name} .. {plan.blocks[s.blocks[1] - 1].name}"
        how = f"streamed to {s.compute_device}" if s.mode == "stream" else "runs there"
        console.print(f"denoiser stage {i}: {names} on {s.device} ({format_bytes(s.weights_bytes)} weights, "
                      f"{format_bytes(s.activation_bytes)} workspace; {how})", markup=False, highlight=False)
    if img:
        console.print(f"Predicted: {img.seconds_per_image:.2f} s/image (encode {img.encode_seconds:.3f} s, "
                      f"{img.steps} x {img.step_seconds:.3f} s denoise, decode {img.decode_seconds:.3f} s, "
                      f"moves {img.move_seconds:.3f} s)", markup=False, highlight=False)
    for n in plan.notes:
        console.print(f"note: {n}", markup=False, highlight=False, style="dim")
    if plan.fits:
        verdict = "Fits on the GPUs."
    elif any(p.bytes > p.capacity_bytes for p in plan.phase_peaks):
        verdict = "Does not fit on the devices as given."
    else:
        verdict = "Fits, with denoiser blocks off the GPUs (host RAM or disk)."
    console.print(verdict, markup=False, highlight=False)


def plan_command(args, console) -> int:
    """``vramancer plan PIPELINE``: the pipeline plan as a table (or JSON), exit 3 when it does not fit."""
    import json
    import sys

    from ..devices.spec import check_backing, parse_devices
    from ..models.pipeline import pipeline_profile

    gguf = str(args.model).endswith(".gguf")
    prof = pipeline_profile(args.model, config=getattr(args, "pipeline_config", None) if gguf else None,
                            dtype=getattr(args, "dtype", None) if gguf else None)
    devs = parse_devices(args.devices, backing=check_backing(args.backing))
    w = ImageWorkload(height=args.height, width=args.width, batch=args.batch, steps=args.steps,
                      guidance=args.guidance, cfg_doubles="Flux" not in prof.pipeline_class)
    plan = plan_pipeline(prof, devs, w, reserve_bytes=args.reserve)
    if args.output:
        plan.save(args.output)
    if args.json:
        sys.stdout.write(json.dumps(plan.to_dict(), indent=2) + "\n")
    else:
        render_pipeline_plan(plan, console)
    over = [p for p in plan.phase_peaks if p.bytes > p.capacity_bytes]
    if over:
        print(f"vramancer: error: {plan.model} does not fit: "
              + "; ".join(f"{p.device} is {format_bytes(p.bytes - p.capacity_bytes)} short in {p.phase}" for p in over),
              file=sys.stderr)
        return 3
    return 0
