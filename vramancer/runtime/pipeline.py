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
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError
from .boundary import BoundaryHook, BoundaryStats, StageInputCache, move_tensors

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..plan.plan import ComponentPlacement, Plan
    from .stream import StreamEngine

__all__ = ["load_pipeline", "PipelineRuntime", "plan_for_pipeline"]


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
        self.attached = False

    # -- placement --------------------------------------------------------------------------------
    def _component(self, name: str) -> nn.Module:
        mod = getattr(self.pipe, name, None)
        if mod is None:
            raise BadInputError(f"the plan places component {name!r}, which this pipeline does not have; "
                                "plan again for this pipeline")
        return mod

    def attach(self) -> PipelineRuntime:
        if self.attached:
            return self
        for cp in self.plan.components:
            mod = self._component(cp.name)
            if cp.role == "denoiser":
                self._place_denoiser(mod)
                if cp.mode == "moved":
                    self._add_moved(cp, mod)
            elif cp.mode == "resident":
                mod.to(_torch_device(self.plan, cp.device))
            elif cp.mode == "cpu":
                mod.to("cpu")
            elif cp.mode == "moved":
                self._add_moved(cp, mod)
        self.attached = True
        return self

    def _add_moved(self, cp: ComponentPlacement, mod: nn.Module) -> None:
        import torch

        dev = _torch_device(self.plan, cp.device.split(",")[0])
        mod.to("cpu")
        mv = _Moved(cp.name, mod, dev, torch.device("cpu"))
        self.moved[cp.name] = mv
        for _, child in mod.named_children():
            self._handles.append(child.register_forward_pre_hook(
                lambda m, a, kw, mv=mv: self._enter(mv, a, kw), with_kwargs=True))

    def _enter(self, mv: _Moved, args: tuple, kwargs: dict):
        for other in self.moved.values():
            if other is not mv and other.on_device and other.device == mv.device:
                other.module.to(other.home)
                other.on_device = False
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
        for st in self.stages:
            move = st.compute_device != first
            for j, (_, mod) in enumerate(st.units):
                entry = j == 0
                if st.index == 0 or not (entry or move):
                    continue
                hook = BoundaryHook(st.compute_device, self._caches[st.index], st.stats, entry=entry, move=move)
                h.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
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
                      eager_attention: bool = False) -> Plan:
    """The pipeline Plan of a folder / single file on ``devices`` (a spec string or Device list)."""
    from ..devices.spec import check_backing, parse_devices
    from ..models.pipeline import ImageWorkload, pipeline_profile
    from ..plan.pipeline import plan_pipeline

    prof = pipeline_profile(model, eager_attention=eager_attention)
    devs = parse_devices(devices, backing=check_backing(backing))
    w = ImageWorkload(height=height, width=width, batch=batch, steps=steps, guidance=guidance,
                      cfg_doubles="Flux" not in prof.pipeline_class)
    return plan_pipeline(prof, devs, w, reserve_bytes=reserve_bytes)


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
                                 guidance=guidance, reserve_bytes=reserve_bytes, backing=backing)
    if not isinstance(plan, Plan) or not plan.is_pipeline:
        raise BadInputError("load_pipeline needs a pipeline plan (with components); this plan is a model's")
    dt = torch_dtype(dtype or plan.workload.dtype)
    path = os.fspath(model)
    import diffusers

    if os.path.isdir(path):
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, dtype=dt, local_files_only=True)
    else:
        from ..models.pipeline import pipeline_profile

        prof = pipeline_profile(path)
        if config is None or not os.path.isdir(os.fspath(config)):
            raise BadInputError(f"{os.path.basename(path)}: a single-file checkpoint runs with config=<local diffusers "
                                f"folder of a {prof.pipeline_class}> (nothing is downloaded)")
        cls = getattr(diffusers, prof.pipeline_class)
        pipe = cls.from_single_file(path, config=os.fspath(config), dtype=dt, local_files_only=True)
    with torch.no_grad():
        rt = PipelineRuntime(pipe, plan).attach()
    pipe.vramancer = rt
    return pipe
