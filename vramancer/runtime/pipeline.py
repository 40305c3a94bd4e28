"""Image pipelines at run time: a diffusers pipeline whose components sit where the pipeline Plan
says, used as diffusers users use it::

    pipe = vramancer.load_pipeline("./sdxl", devices="rtx3060:12GiB,rtx3060:8GiB", height=1024, width=1024)
    image = pipe("a lighthouse at dusk", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]
    pipe.vramancer.plan                # the Plan (components, phase peaks, denoiser stages)

The denoiser is split like an LLM: its blocks (the plan's ``blocks[i].modules``) go to their stage's
device; a ``BoundaryHook`` (runtime/boundary.py) on each unit of a stage moves what it receives
(hidden states, the time embedding, text embeddings, the UNet's skip tuples, rotary tables) onto
the stage's compute device, and the denoiser's root hooks move its inputs onto the first stage and
its output back where the caller's latents are. A streamed stage keeps its weights in host RAM and
runs through a ``StreamEngine`` (runtime/stream.py), as for LLMs. A component the plan "moves" lives
in host RAM and comes onto its device when one of its modules first runs in a call (a forward pre-hook
on each child module, so ``vae.decode`` counts as well as ``forward``); entering another component
sends the moved ones back to the host (one moved component on a device at a time). Simulated
devices are backed by their real torch device (the CPU in tests), so the same hooks run everywhere.
The same hooks tell ``phase_listener`` when a call enters encode / denoise / decode: ``vramancer run
PIPELINE --monitor / --trace FILE`` samples the real devices in those phases (``PhaseRecorder``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError, MalformedCheckpointError
from .boundary import BoundaryStats, StageInputCache, move_tensors
from .split import add_boundary_hooks

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..plan.plan import ComponentPlacement, Plan
    from .stream import StreamEngine

__all__ = ["load_pipeline", "PipelineRuntime", "plan_for_pipeline", "run_command", "demo_image", "build_demo_pipeline",
           "PhaseRecorder", "load_gguf_pipeline", "flux_to_diffusers"]


def _torch_device(plan: Plan, device_id: str) -> torch.device:
    import torch

    dev = next((d for d in plan.devices if d.id == device_id), None)
    name = dev.torch_device if dev is not None else "cpu"
    d = torch.device(name)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


@dataclass
class _Moved:
    """A component kept in host RAM and moved onto ``device`` for its phase."""

    name: str
    module: nn.Module
    device: torch.device
    home: torch.device
    on_device: bool = False
    moves: int = 0
    evicts: tuple[int, ...] = ()
    phase: str = "encode"


@dataclass
class _StageRun:
    index: int
    device: torch.device
    compute_device: torch.device
    mode: str
    units: list[tuple[str, nn.Module]] = field(default_factory=list)
    stats: BoundaryStats = field(default_factory=BoundaryStats)


class PipelineRuntime:
    """Everything that makes ``pipe`` run as planned: attach() places and hooks, detach() unhooks."""

    def __init__(self, pipe: Any, plan: Plan):
        self.pipe = pipe
        self.plan = plan
        self.stages: list[_StageRun] = []
        self.engines: list[StreamEngine] = []
        self.moved: dict[str, _Moved] = {}
        self._handles: list[Any] = []
        self._caches: list[StageInputCache] = []
        self._caller_device: list[torch.device] = []
        self.denoiser_calls = 0
        self.evicted: set[int] = set()     # denoiser stages sent to host RAM by a moved component
        self.evictions = 0
        self.phase_listener: Any = None    # called with "encode" / "denoise" / "decode" as a call goes
        self.attached = False

    # -- placement --------------------------------------------------------------------------------
    def _component(self, name: str) -> nn.Module:
        mod = getattr(self.pipe, name, None)
        if mod is None:
            raise BadInputError(f"the plan places component {name!r}, which this pipeline does not have; "
                                "plan again for this pipeline")
        return mod

    def attach(self) -> PipelineRuntime:
        import torch

        if self.attached:
            return self
        for cp in self.plan.components:
            mod = self._component(cp.name)
            if cp.role == "denoiser":
                self._place_denoiser(mod)
                if cp.mode == "moved":
                    self._add_moved(cp, mod)
            elif cp.mode in ("resident", "cpu"):
                dev = _torch_device(self.plan, cp.device) if cp.mode == "resident" else torch.device("cpu")
                mod.to(dev)
                # its inputs come from the pipeline's execution device: moved onto its own
                for _, child in mod.named_children():
                    self._handles.append(child.register_forward_pre_hook(
                        lambda m, a, kw, dev=dev, ph=cp.phase: self._resident_entry(ph, dev, a, kw),
                        with_kwargs=True))
            elif cp.mode == "moved":
                self._add_moved(cp, mod)
        self.attached = True
        return self

    def _add_moved(self, cp: ComponentPlacement, mod: nn.Module) -> None:
        import torch

        dev = _torch_device(self.plan, cp.device.split(",")[0])
        mod.to("cpu")
        mv = _Moved(cp.name, mod, dev, torch.device("cpu"), evicts=tuple(cp.evicts), phase=cp.phase)
        self.moved[cp.name] = mv
        for _, child in mod.named_children():
            self._handles.append(child.register_forward_pre_hook(
                lambda m, a, kw, mv=mv: self._enter(mv, a, kw), with_kwargs=True))

    def _phase(self, name: str) -> None:
        if self.phase_listener is not None:
            self.phase_listener(name)

    def _resident_entry(self, phase: str, dev: torch.device, args: tuple, kwargs: dict):
        self._phase(phase)
        return move_tensors(args, dev), move_tensors(kwargs, dev)

    def _enter(self, mv: _Moved, args: tuple, kwargs: dict):
        self._phase(mv.phase)
        for other in self.moved.values():
            if other is not mv and other.on_device and other.device == mv.device:
                other.module.to(other.home)
                other.on_device = False
        for i in mv.evicts:     # the denoiser's stages on this device wait in host RAM meanwhile
            if i not in self.evicted:
                for _, m in self.stages[i].units:
                    m.to("cpu")
                self.evicted.add(i)
                self.evictions += 1
        if not mv.on_device:
            mv.module.to(mv.device)
            mv.on_device = True
            mv.moves += 1
        return move_tensors(args, mv.device), move_tensors(kwargs, mv.device)

    def _place_denoiser(self, den: nn.Module) -> None:
        import torch

        plan = self.plan
        named = dict(den.named_modules())
        owned: set[str] = set()
        for si, st in enumerate(plan.stages):
            dev = _torch_device(plan, st.device) if st.kind != "disk" else torch.device("cpu")
            comp = _torch_device(plan, st.compute_device or st.device)
            run = _StageRun(si, dev, comp, st.mode)
            for b in range(*st.blocks):
                for prefix in plan.blocks[b].modules:
                    mod = named.get(prefix)
                    if mod is None:
                        raise BadInputError(f"the plan names module {prefix!r}, which this denoiser does not have; "
                                            "plan again for this pipeline")
                    mod.to(dev)
                    run.units.append((prefix, mod))
                    owned.add(prefix)
            self.stages.append(run)
        first = self.stages[0].compute_device
        # what no block names (parameter-free helpers with buffers) runs with the first stage
        for name, mod in den.named_children():
            if name not in owned and not any(o.startswith(name + ".") for o in owned):
                mod.to(first)
        self._caches = [StageInputCache() for _ in self.stages]
        h = self._handles
        h.append(den.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        h.append(den.register_forward_hook(self._root_post, with_kwargs=True))
        add_boundary_hooks(self.stages, self._caches, h)
        self._stream(den)

    def _stream(self, den: nn.Module) -> None:
        """Stream engines for the streamed stages, one per compute device (the plan's stream buffers)."""
        from .stream import StreamEngine, StreamParam, StreamUnit

        by_compute: dict[str, list[StreamUnit]] = {}
        for st in self.stages:
            if st.mode != "stream":
                continue
            for prefix, mod in st.units:
                unit = StreamUnit(prefix, mod, st.index)
                for name, p in mod.named_parameters(remove_duplicate=False):
                    owner_name, _, attr = name.rpartition(".")
                    owner = mod.get_submodule(owner_name) if owner_name else mod
                    unit.params.append(StreamParam(owner, attr, tuple(p.shape), p.dtype,
                                                   p.numel() * p.element_size(), home=p.data, home_param=p,
                                                   key=f"{prefix}.{name}"))
                by_compute.setdefault(str(st.compute_device), []).append(unit)
        for buf in self.plan.stream_buffers:
            comp = _torch_device(self.plan, buf.device)
            units = by_compute.pop(str(comp), [])
            if units:
                self.engines.append(StreamEngine(units, comp, slot_bytes=buf.slot_bytes, plan_device=buf.device))
        for eng in self.engines:
            for unit in eng.units:
                self._handles.append(unit.module.register_forward_pre_hook(lambda m, a, u=unit, e=eng: e.ensure(u)))
                self._handles.append(unit.module.register_forward_hook(lambda m, a, o, u=unit, e=eng: e.release(u)))

    # -- denoiser root hooks ------------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        import torch

        self.denoiser_calls += 1
        self._phase("denoise")
        if self.evicted:        # back to their devices, and the moved components off them, before a step
            for mv in self.moved.values():
                if mv.on_device and mv.evicts:
                    mv.module.to(mv.home)
                    mv.on_device = False
            for i in sorted(self.evicted):
                for _, m in self.stages[i].units:
                    m.to(self.stages[i].device)
            self.evicted.clear()
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        self._caller_device = [x.device] if isinstance(x, torch.Tensor) else []
        dev = self.stages[0].compute_device
        return move_tensors(args, dev), move_tensors(kwargs, dev)

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not self._caller_device:
            return output
        dev = self._caller_device[0]
        if hasattr(output, "keys"):
            for k in list(output.keys()):
                output[k] = move_tensors(output[k], dev)
            return output
        return move_tensors(output, dev)

    # -- teardown ---------------------------------------------------------------------------------------
    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for eng in self.engines:
            eng.close()
        self.engines = []
        self.attached = False
        if getattr(self.pipe, "vramancer", None) is self:
            try:
                del self.pipe.vramancer
            except AttributeError:  # pragma: no cover
                pass

    def boundary_stats(self) -> list[dict]:
        return [dict(stage=s.index, **s.stats.to_dict()) for s in self.stages]

    def __repr__(self) -> str:
        parts = ", ".join(f"{self.plan.stages[s.index].device}[{self.plan.stages[s.index].blocks[0]}:"
                          f"{self.plan.stages[s.index].blocks[1]}]{'*' if s.mode == 'stream' else ''}"
                          for s in self.stages)
        return f"PipelineRuntime({parts})"


def plan_for_pipeline(model: Any, devices: Any = "auto", *, height: int = 1024, width: int = 1024, batch: int = 1,
                      steps: int = 28, guidance: float = 3.5, reserve_bytes: Any = None, backing: str = "cpu",
                      eager_attention: bool = False, config: str | os.PathLike | None = None,
                      dtype: str | None = None) -> Plan:
    """The pipeline Plan of a folder / single file / GGUF denoiser on ``devices`` (a spec string or
    Device list); ``config`` the local diffusers folder around a GGUF denoiser (its other components
    planned from their weights), ``dtype`` that denoiser's compute dtype."""
    from ..devices.spec import check_backing, parse_devices
    from ..models.pipeline import ImageWorkload, pipeline_profile
    from ..plan.pipeline import plan_pipeline

    gguf = os.fspath(model).endswith(".gguf")
    prof = pipeline_profile(model, eager_attention=eager_attention, config=config if gguf else None,
                            dtype=dtype if gguf else None)
    devs = parse_devices(devices, backing=check_backing(backing))
    w = ImageWorkload(height=height, width=width, batch=batch, steps=steps, guidance=guidance,
                      cfg_doubles="Flux" not in prof.pipeline_class)
    return plan_pipeline(prof, devs, w, reserve_bytes=reserve_bytes)


def _diffusers_error(what: str, e: BaseException) -> MalformedCheckpointError:
    """``what`` and the first line of diffusers' own error, as one line."""
    detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return MalformedCheckpointError(f"{what} ({type(e).__name__}: {detail})")


def load_pipeline(model: str | os.PathLike, devices: Any = "auto", height: int = 1024, width: int = 1024,
                  plan: Plan | None = None, *, batch: int = 1, steps: int = 28, guidance: float = 3.5,
                  dtype: str | None = None, backing: str = "cpu", config: str | os.PathLike | None = None,
                  reserve_bytes: Any = None) -> Any:
    """The diffusers pipeline at ``model`` (a folder with model_index.json, or a single-file
    checkpoint with ``config``: a local diffusers folder of its pipeline, nothing downloaded), its
    components placed by ``plan`` (made here for ``devices`` and the workload when None). The
    runtime is ``pipe.vramancer`` (a PipelineRuntime)."""
    import torch

    from ..plan.plan import Plan
    from .loader import torch_dtype

    if plan is None:
        plan = plan_for_pipeline(model, devices, height=height, width=width, batch=batch, steps=steps,
                                 guidance=guidance, reserve_bytes=reserve_bytes, backing=backing, config=config,
                                 dtype=dtype)
    if not isinstance(plan, Plan) or not plan.is_pipeline:
        raise BadInputError("load_pipeline needs a pipeline plan (with components); this plan is a model's")
    dt = torch_dtype(dtype or plan.workload.dtype)
    path = os.fspath(model)
    import diffusers

    if os.path.isdir(path):
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, dtype=dt, local_files_only=True)
    elif path.endswith(".gguf"):
        pipe = load_gguf_pipeline(path, config, dt)
    else:
        from ..models.pipeline import pipeline_profile

        prof = pipeline_profile(path)
        if config is None or not os.path.isdir(os.fspath(config)):
            raise BadInputError(f"{os.path.basename(path)}: a single-file checkpoint runs with --pipeline-config DIR "
                                f"(config= in Python): a local diffusers folder of a {prof.pipeline_class} "
                                "(nothing is downloaded)")
        check_single_file_components(path)
        cls = getattr(diffusers, prof.pipeline_class)
        try:
            pipe = cls.from_single_file(path, config=os.fspath(config), dtype=dt, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as e:
            raise _diffusers_error(f"{os.path.basename(path)}: diffusers could not build a {prof.pipeline_class} "
                                   f"from it with the configs of {os.fspath(config)}", e) from None
    with torch.no_grad():
        rt = PipelineRuntime(pipe, plan).attach()
    pipe.vramancer = rt
    return pipe


def flux_to_diffusers(checkpoint: dict) -> dict:
    """A BFL-named Flux transformer state dict (ComfyUI-GGUF's, GGUFParameter blocks kept) under
    diffusers' names, by diffusers' own converter. That converter splits each single block's fused
    ``linear1`` at FLUX.1's widths (3 x 3072 + 12288 rows); for any other width those splits are made
    here at the file's width (``img_in`` rows) and the converter is given placeholders of its shape."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    sd = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()}
    inner = int(sd["img_in.weight"].shape[0])
    fixed = 3 * 3072 + 12288
    pieces: dict[str, tuple] = {}
    if inner != 3072:
        for k in [k for k in sd if k.startswith("single_blocks.") and k.endswith((".linear1.weight", ".linear1.bias"))]:
            t = sd[k]
            rows = int(t.shape[0])
            if rows <= 3 * inner:
                raise KeyError(f"{k} has {rows} rows, not 3 x {inner} + the MLP's")
            pieces[k] = torch.split(t, (inner, inner, inner, rows - 3 * inner), dim=0)
            sd[k] = torch.empty((fixed, 0) if t.dim() == 2 else (fixed,))
    out = convert(sd)
    for k, parts in pieces.items():
        i, kind = k.split(".")[1], k.rsplit(".", 1)[1]
        for name, t in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts, strict=True):
            out[f"single_transformer_blocks.{i}.{name}.{kind}"] = torch.cat([t])   # own storage, as diffusers'
    return out


def _ldm_unet(checkpoint: dict) -> dict:
    """An SD1.5 / SDXL UNet of ComfyUI-GGUF (LDM names without their prefix): prefixed back, for
    diffusers' own LDM converter (run by from_single_file)."""
    from ..models.pipeline import GGUF_PREFIX

    return {GGUF_PREFIX + k.removeprefix(GGUF_PREFIX): v for k, v in checkpoint.items()}


_GGUF_CONVERTERS = {"flux": flux_to_diffusers, "sd1": _ldm_unet, "sdxl": _ldm_unet}


def load_gguf_pipeline(path: str, config: str | os.PathLike | None, dt: torch.dtype) -> Any:
    """A GGUF denoiser (ComfyUI-GGUF) kept quantized by diffusers' GGUF support (GGUFParameter
    blocks, dequantized layer by layer in ``compute_dtype`` ``dt``), converted to diffusers' names,
    in the pipeline of the local diffusers folder ``config`` (its other components from there)."""
    import diffusers
    from diffusers import GGUFQuantizationConfig
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    from ..models.pipeline import GGUF_DENOISERS, pipeline_profile

    name = os.path.basename(path)
    prof = pipeline_profile(path)       # the architecture checked: one line when it is not run here
    arch = next(a for a, v in GGUF_DENOISERS.items() if f"gguf:{v[0]}" == prof.layout)
    _, pipeline_class, den_class, den_name = GGUF_DENOISERS[arch]
    if config is None or not os.path.isdir(os.fspath(config)):
        raise BadInputError(f"{name}: a GGUF denoiser runs with --pipeline-config DIR (config= in Python): a local "
                            f"diffusers folder of a {pipeline_class}, its text encoders and VAE with weights "
                            "(nothing is downloaded)")
    config = os.fspath(config)
    pipeline_profile(path, config=config)     # the folder checked: its class, its components' weights
    try:
        sd = _GGUF_CONVERTERS[arch](load_gguf_checkpoint(path))
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise _diffusers_error(f"{name}: not a {arch} transformer diffusers can convert", e) from None
    cls = getattr(diffusers, den_class)
    try:
        den = cls.from_single_file(sd, config=config, subfolder=den_name, torch_dtype=dt, local_files_only=True,
                                   quantization_config=GGUFQuantizationConfig(compute_dtype=dt))
        pipe = getattr(diffusers, pipeline_class).from_pretrained(config, **{den_name: den}, dtype=dt,
                                                                  local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as e:
        raise _diffusers_error(f"{name}: diffusers could not build a {pipeline_class} from it with {config}",
                               e) from None
    return pipe


# parts of a component diffusers' single-file converter reads whole: (layout, component, tensor name prefix)
_REQUIRED_PARTS = (
    ("sd15", "vae", "first_stage_model.encoder."), ("sdxl", "vae", "first_stage_model.encoder."),
    ("sd3", "vae", "first_stage_model.encoder."), ("flux", "vae", "vae.encoder."),
)


def check_single_file_components(path: str | os.PathLike) -> None:
    """One line (MalformedCheckpointError) when a single-file checkpoint holds only part of a component
    that diffusers' ``from_single_file`` converts whole: it would leave the rest on the meta device
    and fail deep inside the load. ComfyUI-pruned files often drop the VAE encoder (text-to-image
    never runs it). A component absent altogether is left to diffusers (it takes it from the config
    folder when that folder has its weights)."""
    from ..models.checkpoint import read_safetensors_header
    from ..models.pipeline import single_file_layout

    tensors, _ = read_safetensors_header(path)
    names = [t.name for t in tensors]
    layout = single_file_layout(names)
    if layout is None:
        return
    for key, comp, part in _REQUIRED_PARTS:
        whole = part[:part.index(".") + 1]        # the component's own prefix: first_stage_model. / vae.
        if key == layout.key and any(n.startswith(whole) for n in names) \
                and not any(n.startswith(part) for n in names):
            raise MalformedCheckpointError(f"{os.path.basename(os.fspath(path))}: the {comp} has no encoder "
                                           f"weights ({part}*; pruned files drop them) and diffusers' "
                                           "single-file loader builds the whole VAE: use a checkpoint that "
                                           "has them")


# -- commands -----------------------------------------------------------------------------------------
def _quiet_loading() -> None:
    """The CLI process: no per-component progress bars between our lines."""
    from diffusers.utils import logging as df_logging
    from transformers.utils import logging as hf_logging

    df_logging.disable_progress_bar()
    hf_logging.disable_progress_bar()


def _render(console: Any, plan: Plan) -> None:
    from ..plan.pipeline import render_pipeline_plan

    render_pipeline_plan(plan, console)


def _save_png(image: Any, path: str) -> None:
    from .._io import atomic_open

    with atomic_open(path, "wb", flag="-o") as f:
        image.save(f, format="PNG")


def run_command(args: Any, prompt: str) -> int:
    """``vramancer run PIPELINE --prompt ... --steps N --seed S -o out.png``: plan (or read --plan),
    load split, make the image, write it atomically, print the plan and the measured seconds."""
    import time

    import torch
    from rich.console import Console

    from .._io import check_writable
    from ..plan.plan import Plan

    recording = bool(getattr(args, "monitor", False) or getattr(args, "trace", None))
    if recording:   # bad flags refused before anything is planned or loaded
        from .watch import check_monitor_interval, check_trace_path

        check_monitor_interval(args.monitor_interval)
        if args.trace is not None:
            check_trace_path(args.trace)
    _quiet_loading()
    out = getattr(args, "output", None) or "out.png"
    check_writable(out, "-o")
    if args.plan:
        plan = Plan.load(args.plan)
        if not plan.is_pipeline:
            raise BadInputError(f"--plan {args.plan} is a model's plan, not an image pipeline's")
    else:
        plan = plan_for_pipeline(args.model, args.devices, height=args.height, width=args.width, batch=args.batch,
                                 steps=args.steps, guidance=args.guidance, reserve_bytes=args.reserve,
                                 backing=args.backing, config=getattr(args, "pipeline_config", None),
                                 dtype=getattr(args, "dtype", None))
    console = Console(highlight=False)
    quiet = getattr(args, "json", False)
    if not quiet:
        _render(console, plan)
    over = [p for p in plan.phase_peaks if p.bytes > p.capacity_bytes]
    if over:   # a plan without GPUs runs on the host: only memory beyond a device's stops it
        from ..errors import DoesNotFitError
        from ..units import format_bytes

        raise DoesNotFitError(f"{plan.model} does not fit: " + "; ".join(
            f"{p.device} is {format_bytes(p.bytes - p.capacity_bytes)} short in {p.phase}" for p in over))
    pipe = load_pipeline(args.model, plan=plan, dtype=getattr(args, "dtype", None),
                         config=getattr(args, "pipeline_config", None))
    pipe.set_progress_bar_config(disable=True)
    img = plan.image
    gen = torch.Generator().manual_seed(0 if args.seed is None else args.seed)
    phases = PhaseRecorder(args.monitor_interval, pipe.vramancer) if recording else None
    t0 = time.perf_counter()
    try:
        result = pipe(prompt, num_inference_steps=img.steps, height=img.height, width=img.width,
                      guidance_scale=img.guidance, num_images_per_prompt=img.batch, generator=gen)
    finally:
        if phases is not None:
            phases.finish(args.trace)
    seconds = time.perf_counter() - t0
    _save_png(result.images[0], out)
    per_image = seconds / img.batch
    if quiet:
        import json

        print(json.dumps({"output": out, "seconds_per_image": round(per_image, 4),
                          "predicted_seconds_per_image": img.seconds_per_image, "plan": plan.to_dict()}, indent=2))
    else:
        console.print(f"wrote {out}: {per_image:.2f} s/image measured, {img.seconds_per_image:.2f} s predicted",
                      markup=False)
        if phases is not None and args.monitor:
            phases.render(console)
        if phases is not None and args.trace:
            console.print(f"trace: {args.trace} (vramancer report {args.trace})", markup=False)
    pipe.vramancer.detach()
    return 0


class PhaseRecorder:
    """Samples this machine's real devices (torch / NVML / host RAM: a simulated card's bytes are
    the plan's, per phase above) through one image call, in the phases encode / denoise / decode as
    the pipeline enters them (the runtime's hooks say when), one sample closing each phase."""

    def __init__(self, interval_s: float, runtime: PipelineRuntime):
        from ..telemetry.recorder import Recorder

        self.recorder = Recorder(interval=interval_s).start()
        self.runtime = runtime
        self.current: str | None = None
        self._open: Any = None
        runtime.phase_listener = self.switch

    def switch(self, name: str) -> None:
        if name == self.current:
            return
        self._leave()
        self.current = name
        self._open = self.recorder.phase(name)
        self._open.__enter__()

    def _leave(self) -> None:
        cm, self._open = self._open, None
        if cm is not None:
            self.recorder.sample_once()
            cm.__exit__(None, None, None)

    def finish(self, trace: str | None) -> None:
        self._leave()
        self.runtime.phase_listener = None
        self.recorder.stop()
        if trace:
            if str(trace).lower().endswith(".csv"):
                self.recorder.to_csv(trace)
            else:
                self.recorder.to_json(trace)

    def render(self, console: Any) -> None:
        from ..telemetry.commands import render_report
        from ..telemetry.export import Trace

        rec = self.recorder
        render_report(Trace(snapshots=rec.snapshots(), phases=rec.phases(), marks=rec.marks(), interval=rec.interval,
                            path="this run"), rec.peaks(), console=console)


def build_demo_pipeline(folder: str | os.PathLike) -> str:
    """A tiny Stable Diffusion 1.5-shaped pipeline with random weights, built offline (a CLIP BPE
    tokenizer written here) and saved in ``folder``; returns its path. Kept when it is already there."""
    import json
    import warnings
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(folder)
    if (root / "model_index.json").is_file():
        return str(root)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
    import shutil

    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "pipe", root)

    shutil.rmtree(tmp, ignore_errors=True)
    return str(root)


def demo_image(args: Any) -> int:
    """``vramancer demo --image``: a tiny random pipeline built offline, its UNet split over two
    simulated GPUs (or the devices given), an image made split and unsplit: the same pixels."""
    import warnings

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from rich.console import Console

    from .._paths import cache_dir
    from ..devices.spec import parse_devices
    from ..models.pipeline import ImageWorkload, pipeline_profile
    from ..plan.pipeline import plan_pipeline

    _quiet_loading()
    console = Console(highlight=False)
    folder = build_demo_pipeline(os.path.join(args.cache_dir or str(cache_dir()), "demo-image-pipeline"))
    prof = pipeline_profile(folder)
    devs = parse_devices(args.devices or "rtx3060,rtx3060", backing=args.backing or "cpu")
    gpus = [d for d in devs if d.kind == "gpu"]
    w = ImageWorkload(height=32, width=32, batch=1, steps=4, guidance=5.0)
    ids = None
    if len(gpus) >= 2:   # the point of the demo is the split: deal the UNet's blocks over the GPUs
        n = prof.denoiser.num_blocks
        ids = [gpus[min(b * len(gpus) // n, len(gpus) - 1)].id for b in range(n)]
    plan = plan_pipeline(prof, devs, w, block_devices=ids)
    if not args.json:
        console.print(f"vramancer demo --image: a tiny Stable Diffusion pipeline with random weights "
                      f"(its image is noise; the point is the split), in {folder}", markup=False)
        _render(console, plan)
    kw = dict(num_inference_steps=w.steps, height=w.height, width=w.width, guidance_scale=w.guidance)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(folder, plan=plan)
        pipe.set_progress_bar_config(disable=True)
        split = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **kw).images[0]
        stats = pipe.vramancer.boundary_stats()
        pipe.vramancer.detach()
        ref = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        unsplit = ref(args.prompt, generator=torch.Generator().manual_seed(0), **kw).images[0]
    same = bool(np.array_equal(np.asarray(split), np.asarray(unsplit)))
    if args.json:
        import json

        print(json.dumps({"pipeline": folder, "stages": len(plan.stages), "matches_unsplit": same,
                          "boundary": stats, "plan": plan.to_dict()}, indent=2))
    else:
        console.print(f"split over {len(plan.stages)} stages; image equals the unsplit pipeline's: "
                      f"{'yes' if same else 'NO'}", markup=False)
    return 0 if same else 1
