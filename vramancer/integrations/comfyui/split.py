"""A ComfyUI MODEL's denoiser split over devices, through ComfyUI's own model management.

``split_model(patcher, devices=...)`` returns a clone of the ``ModelPatcher`` (ComfyUI's MODEL) that
carries a ``SplitState`` as an attachment, and three of ComfyUI's public hook points, all copied when
ComfyUI clones the patcher again (a LoRA loader after the split keeps the split):

- an ``ON_LOAD`` callback: after ComfyUI's ``ModelPatcher.load`` has put the weights on its load
  device with the LoRA / weight patches applied (and its backups of the unpatched weights kept), each
  planned block's modules go to their stage's device; a streamed stage's layers stay in host RAM with
  ComfyUI's own weight casting on (``comfy_cast_weights``: each layer's weights are cast onto the
  compute device as it runs, as ComfyUI's lowvram mode does). ComfyUI's ``unpatch_model`` /
  ``detach`` later restores the unpatched weights and moves the whole model to its offload device as
  usual, so unloading, LoRA changes and memory freeing keep working; an ``ON_DETACH`` callback covers
  ComfyUI letting go without unpatching (another clone of the same model, e.g. the unsplit MODEL, is
  being loaded): the blocks placed away from the load device go to the offload device and the model
  counts as unloaded, so ComfyUI's next load places every weight itself;
- a ``DIFFUSION_MODEL`` wrapper: for each denoiser call it moves the inputs onto the first stage's
  device, puts forward pre-hooks on the layers of every stage (the tensors a layer receives go to its
  stage's compute device, each shared tensor - time embedding, text context - once per stage and
  call), runs ComfyUI's forward, removes the hooks and moves the output back where the latents are.
  Outside these calls the shared ``diffusion_model`` carries no hook: the unsplit MODEL it was
  cloned from runs exactly as before;
- an ``output_block_patch`` (UNets): the skip connection of an output block is concatenated in the
  model's forward, outside any layer; the patch moves the skip tensor and the hidden states onto the
  output block's stage device first.

The plan comes from the LLM partitioner on the denoiser's blocks as they are held in memory
(``module_denoiser_profile``: ``time_embed`` / ``input_blocks.N`` / ``middle_block`` /
``output_blocks.N`` / ``out`` for a UNet, ``double_blocks.N`` / ``single_blocks.N`` for Flux), for
one denoising forward of ``height`` x ``width`` pixels (classifier-free guidance: twice the batch).
Nothing here imports ComfyUI at import time; torch is imported inside the functions.
"""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import BadInputError
from ...runtime.boundary import BoundaryStats
from ...units import format_bytes
from .report import TRACKER

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ...plan.plan import Plan

__all__ = ["SplitState", "StageRun", "plan_split", "split_model", "plan_text", "KEY"]

KEY = "vramancer_split"


@dataclass
class StageRun:
    """One planned stage as it runs: the torch device holding its weights, the one it computes on,
    and its blocks' module prefixes under ``diffusion_model``."""

    index: int
    plan_device: str
    device: torch.device
    compute_device: torch.device
    mode: str
    prefixes: list[str]
    stats: BoundaryStats = field(default_factory=BoundaryStats)


def _torch_device(plan: Plan, device_id: str) -> torch.device:
    import torch

    dev = next((d for d in plan.devices if d.id == device_id), None)
    return torch.device(dev.torch_device if dev is not None else "cpu")


def _units(module: nn.Module) -> list[nn.Module]:
    """The layers a block's forward calls: the children of a Sequential (ComfyUI calls the layers of
    a ``TimestepEmbedSequential`` one by one, never the container), else the module itself."""
    import torch

    if isinstance(module, torch.nn.Sequential):
        return [m for m in module.children()] or [module]
    return [module]


def _move(obj: Any, device: torch.device, memo: dict[int, tuple[Any, Any, int]], stats: BoundaryStats) -> Any:
    """Tensors (alone, or in tuples / lists) on ``device``, each copied once per memo (again if it was
    changed in place since, e.g. a ControlNet residual added to a skip tensor); dicts such as
    ComfyUI's ``transformer_options`` pass through untouched."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        hit = memo.get(id(obj))
        if hit is not None and hit[0] is obj and hit[2] == obj._version:   # not changed in place since
            return hit[1]
        moved = obj.to(device, non_blocking=device.type == "cuda")
        memo[id(obj)] = (obj, moved, obj._version)
        stats.copied_bytes += obj.numel() * obj.element_size()
        return moved
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_move(x, device, memo, stats) for x in obj)
    if isinstance(obj, list):
        return [_move(x, device, memo, stats) for x in obj]
    return obj


def _is_control(obj: Any) -> bool:
    """ComfyUI's ControlNet residuals: {"input": [...], "middle": [...], "output": [...]}."""
    return isinstance(obj, dict) and bool(obj) and set(obj) <= {"input", "middle", "output"} \
        and all(isinstance(v, list) for v in obj.values())


class SplitState:
    """The split of one denoiser: its plan, its stages, the text shown on the node. Shared by every
    clone of the patcher it was made for (the attachment returns itself on clone)."""

    def __init__(self, plan: Plan, stages: list[StageRun], weights_bytes: int, text: str):
        self.plan = plan
        self.stages = stages
        self.weights_bytes = weights_bytes
        self.text = text
        self.calls = 0
        self.placements = 0
        self._lock = threading.Lock()
        self._memos: list[dict[int, tuple[Any, Any, int]]] = [{} for _ in stages]
        self._stage_of_prefix = {p: st for st in stages for p in st.prefixes}
        self._cast: dict[int, tuple[Any, bool]] = {}    # layers a streamed stage casts: their flag before

    def on_model_patcher_clone(self) -> SplitState:
        return self

    def __deepcopy__(self, memo: dict) -> SplitState:
        # ComfyUI deep-copies model_options on clone; its output_block_patch is bound to this state,
        # which every clone shares
        return self

    # -- placement (ComfyUI's ON_LOAD callback) ------------------------------------------------------
    def stage_of(self, prefix: str) -> StageRun | None:
        return self._stage_of_prefix.get(prefix)

    def place(self, diffusion_model: nn.Module) -> None:
        """Each block's modules onto its stage's device (weights as ComfyUI patched them); a streamed
        stage's layers stay in host RAM with ComfyUI's weight casting on."""
        import torch

        with torch.no_grad():
            for st in self.stages:
                for prefix in st.prefixes:
                    mod = diffusion_model.get_submodule(prefix)
                    mod.to(st.device)
                    if st.mode == "stream":
                        for m in mod.modules():
                            if hasattr(m, "comfy_cast_weights") and id(m) not in self._cast:
                                self._cast[id(m)] = (m, m.comfy_cast_weights)
                                m.comfy_cast_weights = True
        self.placements += 1

    def _restore_casting(self) -> None:
        for m, before in self._cast.values():
            m.comfy_cast_weights = before
        self._cast.clear()

    def placed(self, diffusion_model: nn.Module) -> bool:
        for st in self.stages:
            for prefix in st.prefixes:
                p = next(diffusion_model.get_submodule(prefix).parameters(), None)
                if p is not None and p.device != st.device:
                    return False
        return True

    def held_bytes(self, diffusion_model: nn.Module) -> dict[str, int]:
        """Bytes of weights each planned device holds now (parameters and buffers of its stages)."""
        out: dict[str, int] = {}
        for st in self.stages:
            n = 0
            for prefix in st.prefixes:
                mod = diffusion_model.get_submodule(prefix)
                n += sum(t.numel() * t.element_size() for t in mod.parameters())
                n += sum(t.numel() * t.element_size() for t in mod.buffers())
            out[st.plan_device] = out.get(st.plan_device, 0) + n
        return out

    def on_load(self, patcher: Any, device_to: Any = None, *args: Any, **kwargs: Any) -> None:
        dm = patcher.model.diffusion_model
        self.place(dm)
        load = getattr(patcher, "load_device", None)
        if load is not None:   # ComfyUI's accounting: what stays on its load device
            import torch

            load = torch.device(load)
            held = 0
            for p in dm.parameters():
                if p.device == load:
                    held += p.numel() * p.element_size()
            patcher.model.model_loaded_weight_memory = held

    def on_detach(self, patcher: Any, unpatch_all: bool = True) -> None:
        """ComfyUI let go of this MODEL. With ``unpatch_all`` it has already moved the whole model to its
        offload device; without (another clone of the same model is being loaded, e.g. the unsplit
        MODEL), the blocks placed away from the load device go to the offload device and the model
        counts as not loaded, so ComfyUI's next load of any clone places every weight itself."""
        import torch

        self._restore_casting()
        if unpatch_all:
            return
        dm = patcher.model.diffusion_model
        load = torch.device(patcher.load_device)
        with torch.no_grad():
            for st in self.stages:
                if st.device != load:
                    for prefix in st.prefixes:
                        dm.get_submodule(prefix).to(patcher.offload_device)
        patcher.model.model_loaded_weight_memory = 0

    # -- run (ComfyUI's DIFFUSION_MODEL wrapper) ------------------------------------------------------
    def _pre_hook(self, st: StageRun):
        memo = self._memos[st.index]

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            moved_args = _move(args, st.compute_device, memo, st.stats)
            moved_kwargs = {k: _move(v, st.compute_device, memo, st.stats) for k, v in kwargs.items()}
            return moved_args, moved_kwargs
        return hook

    def _entry_hook(self, st: StageRun):
        def hook(module: nn.Module, args: tuple):
            st.stats.crossings += 1
        return hook

    def output_block_patch(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
        block = transformer_options.get("block")
        st = self.stage_of(f"output_blocks.{block[1]}") if block and block[0] == "output" else None
        if st is None:
            return h, hsp
        memo = self._memos[st.index]
        return _move(h, st.compute_device, memo, st.stats), _move(hsp, st.compute_device, memo, st.stats)

    def _device_of(self, prefix: str) -> torch.device | None:
        st = self.stage_of(prefix)
        return None if st is None else st.compute_device

    def control_on_devices(self, dm: nn.Module, control: dict) -> dict:
        """A ControlNet's residuals, each on the device of the hidden states it is added to (the model's
        forward adds them outside any layer). UNet: ``apply_control`` pops each list from its end, input
        after input block i, middle after the middle block, output onto the skip tensor of output block j
        (made by input block n-1-j); Flux: ``input[i]`` into double block i, ``output[i]`` into single
        block i."""
        import torch

        if hasattr(dm, "input_blocks"):
            n_in = len(dm.input_blocks)
            middle = sorted((p for p in self._stage_of_prefix if p.split(".")[0] == "middle_block"),
                            key=lambda p: int(p.split(".")[1]) if "." in p else 0)
            places = {"input": lambda call: self._device_of(f"input_blocks.{call}"),
                      "output": lambda call: self._device_of(f"input_blocks.{n_in - 1 - call}"),
                      "middle": lambda call: self._device_of(middle[-1]) if middle else None}
            popped = True
        elif hasattr(dm, "double_blocks"):
            places = {"input": lambda i: self._device_of(f"double_blocks.{i}"),
                      "output": lambda i: self._device_of(f"single_blocks.{i}")}
            popped = False
        else:
            return control
        out = dict(control)
        for name, place in places.items():
            values = control.get(name)
            if not isinstance(values, list):
                continue
            moved = list(values)
            for k, t in enumerate(values):
                dev = place(len(values) - 1 - k if popped else k)
                if isinstance(t, torch.Tensor) and dev is not None and t.device != dev:
                    moved[k] = t.to(dev)
            out[name] = moved
        return out

    def wrapper(self, executor: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        import torch

        dm = executor.class_obj
        with self._lock:
            if not self.placed(dm):     # loaded by a path that skipped ON_LOAD: place now
                self.place(dm)
            first = self.stages[0].compute_device
            handles = []
            try:
                for st in self.stages:
                    self._memos[st.index].clear()
                    for j, prefix in enumerate(st.prefixes):
                        for k, unit in enumerate(_units(dm.get_submodule(prefix))):
                            if j == 0 and k == 0:
                                handles.append(unit.register_forward_pre_hook(self._entry_hook(st)))
                            handles.append(unit.register_forward_pre_hook(self._pre_hook(st), with_kwargs=True))
                memo0 = self._memos[0]
                stats0 = self.stages[0].stats
                xin = _move(x, first, memo0, stats0)
                args = tuple(self.control_on_devices(dm, a) if _is_control(a) else _move(a, first, memo0, stats0)
                             for a in args)
                kwargs = {k: self.control_on_devices(dm, v) if _is_control(v) else _move(v, first, memo0, stats0)
                          for k, v in kwargs.items()}
                devices = {str(st.compute_device) for st in self.stages} | {str(st.device) for st in self.stages}
                with TRACKER.phase("denoise", [torch.device(d) for d in sorted(devices)],
                                   held=lambda: self.held_bytes(dm), planned=self.planned_bytes()):
                    out = executor(xin, *args, **kwargs)
                self.calls += 1
                TRACKER.note_split(id(self), f"split {self.plan.model}: {len(self.stages)} stages, placed on their "
                                   f"devices {self.placements} time{'s' if self.placements != 1 else ''}, "
                                   f"{self.calls} denoiser calls since the node ran")
            finally:
                for h in handles:
                    h.remove()
                for m in self._memos:
                    m.clear()
        if isinstance(out, torch.Tensor) and out.device != x.device:
            out = out.to(x.device)
        return out

    def planned_bytes(self) -> dict[str, tuple[int, int]]:
        """Per planned device: (weights, workspace) bytes of the plan."""
        out: dict[str, tuple[int, int]] = {}
        for s in self.plan.stages:
            w, a = out.get(s.device, (0, 0))
            out[s.device] = (w + s.weights_bytes, a + s.activation_bytes)
        return out


def plan_split(diffusion_model: nn.Module, devices: Any = "auto", *, height: int = 1024, width: int = 1024,
               batch: int = 1, cfg: bool = True, split: str | None = None, reserve: str | None = None,
               backing: str = "cpu", name: str = "model") -> Plan:
    """The partitioner's plan for ``diffusion_model``'s blocks on ``devices`` (a spec string, "auto",
    or a Device list) for one denoising forward at ``height`` x ``width``."""
    from ...devices.spec import parse_devices
    from ...models.pipeline import module_denoiser_profile
    from ...plan.commands import parse_split
    from ...plan.plan import Workload
    from ...plan.planner import plan_profile

    for what, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16:
            raise BadInputError(f"{what} must be a positive multiple of 16 pixels, not {v!r:.40}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise BadInputError(f"batch must be a whole number >= 1, not {batch!r:.40}")
    prof = module_denoiser_profile(diffusion_model, name, arch=f"comfyui:{type(diffusion_model).__name__}")
    devs = parse_devices(devices or "auto", backing=backing)
    tokens = (height // 16) * (width // 16)
    wl = Workload(context=tokens, batch=batch * (2 if cfg else 1), dtype=prof.dtype, objective="latency",
                  prefill_chunk=tokens)
    plan = plan_profile(prof, devs, wl, reserve_bytes=reserve or None, split=parse_split(split or None))
    if any(s.kind == "disk" for s in plan.stages):
        raise BadInputError(f"{name}: the plan puts denoiser blocks on disk; ComfyUI runs weights from RAM or a GPU: "
                            "give more devices or a cpu:SIZE item")
    return plan


def _stage_runs(plan: Plan) -> list[StageRun]:
    runs = []
    for i, s in enumerate(plan.stages):
        prefixes = [m for b in range(*s.blocks) for m in plan.blocks[b].modules]
        runs.append(StageRun(i, s.device, _torch_device(plan, s.device),
                             _torch_device(plan, s.compute_device or s.device), s.mode, prefixes))
    return runs


def plan_text(plan: Plan, weights_bytes: int, height: int, width: int) -> str:
    """What the Split node shows: one line per stage, the prediction and the verdict."""
    lines = [f"VRAMancer split of {plan.model}: {len(plan.blocks)} blocks, {format_bytes(weights_bytes)} weights, "
             f"planned for {width}x{height}, batch {plan.workload.batch} per denoiser call"]
    for i, s in enumerate(plan.stages):
        dev = next((d for d in plan.devices if d.id == s.device), None)
        tdev = dev.torch_device if dev is not None else "cpu"
        how = f"streamed to {s.compute_device}" if s.mode == "stream" else f"runs on {tdev}"
        lines.append(f"stage {i}: {s.device} blocks {s.blocks[0]}-{s.blocks[1] - 1} "
                     f"({plan.blocks[s.blocks[0]].name} .. {plan.blocks[s.blocks[1] - 1].name}): "
                     f"{format_bytes(s.weights_bytes)} weights + {format_bytes(s.activation_bytes)} workspace "
                     f"of {format_bytes(s.capacity_bytes)}; {how}")
    lines.append(f"predicted: {plan.predicted.prefill_tokens_per_s:.0f} latent tokens/s per denoiser call")
    lines.append("fits on the GPUs" if plan.fits else "blocks off the GPUs (host RAM): slower")
    return "\n".join(lines)


def split_model(patcher: Any, devices: Any = "auto", *, height: int = 1024, width: int = 1024, batch: int = 1,
                cfg: bool = True, split: str | None = None, reserve: str | None = None,
                backing: str | None = None) -> tuple[Any, SplitState]:
    """A clone of ComfyUI's ``patcher`` whose denoiser's blocks are stored and run on their planned
    devices (see the module docstring), and its SplitState."""
    import comfy.patcher_extension as ext

    dm = patcher.model.diffusion_model
    if backing is None:
        import comfy.model_management as mm

        real = mm.get_torch_device()
        backing = "cpu" if real.type == "cpu" else str(real if real.index is not None else f"{real.type}:0")
    name = type(patcher.model).__name__
    plan = plan_split(dm, devices, height=height, width=width, batch=batch, cfg=cfg, split=split, reserve=reserve,
                      backing=backing, name=name)
    stages = _stage_runs(plan)
    weights = sum(b.weights_bytes for b in plan.blocks)
    state = SplitState(plan, stages, weights, plan_text(plan, weights, height, width))
    m = patcher.clone()
    # its own weights in ComfyUI's eyes: loading it after the unsplit MODEL (same weights, loaded
    # whole on one device) unpatches and loads again, so ON_LOAD places the blocks inside ComfyUI's load
    m.patches_uuid = uuid.uuid4()
    # a split of a split replaces it
    m.remove_callbacks_with_key(ext.CallbacksMP.ON_LOAD, KEY)
    m.remove_callbacks_with_key(ext.CallbacksMP.ON_DETACH, KEY)
    m.remove_wrappers_with_key(ext.WrappersMP.DIFFUSION_MODEL, KEY)
    m.set_attachments(KEY, state)
    m.add_callback_with_key(ext.CallbacksMP.ON_LOAD, KEY, state.on_load)
    m.add_callback_with_key(ext.CallbacksMP.ON_DETACH, KEY, state.on_detach)
    m.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, KEY, state.wrapper)
    if any(p.startswith("output_blocks.") for st in stages for p in st.prefixes):
        patches = m.model_options["transformer_options"].setdefault("patches", {})
        patches["output_block_patch"] = [p for p in patches.get("output_block_patch", [])
                                         if getattr(p, "__self__", None) is None
                                         or not isinstance(p.__self__, SplitState)]
        m.set_model_output_block_patch(state.output_block_patch)
    return m, state
