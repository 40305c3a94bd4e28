"""The split model at run time: its stages, the hooks that carry activations across stage
boundaries and stream offloaded weights, and the memory each stage measures.

``SplitRuntime`` is attached to a loaded model as ``model.vramancer``::

    model = vramancer.load("./my-model", devices="rtx3090,rtx3060")
    model.generate(...)                         # transformers interface, unchanged
    rt = model.vramancer
    rt.plan, rt.stages, rt.memory_report()      # the plan, the stages, measured bytes vs plan
    rt.detach()                                 # remove every hook (weights stay where they are)

A ``RuntimeStage`` is a unit with a tensors-in / tensors-out boundary: ``stage.forward(hidden,
**layer_kwargs)`` runs its repeated layers on a hidden-state tensor with the keyword arguments the
model passes each of its layers (mask, position embeddings, positions, ``cache``); give each stage its
own cache (``stage.new_cache()``) to run stages of different requests at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .boundary import BoundaryHook, BoundaryStats, StageInputCache, move_tensors
from .memory import (
    CacheBytes,
    MemoryReport,
    RuntimeBytes,
    StageMemoryReport,
    cache_layer_bytes,
    experts_bytes,
    stage_bytes,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..plan.plan import Plan, Stage
    from .checkpoint import Checkpoint
    from .experts import HostExperts
    from .layout import StageLayout
    from .stream import PhaseHook, StreamEngine, StreamUnit

__all__ = ["RuntimeStage", "SplitRuntime", "free_module", "add_boundary_hooks"]


def free_module(model: nn.Module) -> None:
    """Point every parameter and buffer of ``model`` at ``meta`` (no memory) and give cached device
    memory back."""
    import gc

    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, torch.empty_like(b, device="meta"))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class RuntimeStage:
    """One pipeline stage as loaded. ``plan``: its stage in the plan; ``mode``: the plan's;
    ``device``: the torch device where its weights live; ``compute_device``: the torch device where it
    runs (the same unless ``mode`` is "stream", or "phase": prefill there, decode on ``device``).
    ``units``: its modules in run order (name, module); ``layers``: its repeated layers as (layer index, module)."""

    index: int
    plan: Stage
    mode: str
    device: torch.device
    compute_device: torch.device
    units: list[tuple[str, nn.Module]]
    layers: list[tuple[int, nn.Module]]
    config: Any = None
    stats: BoundaryStats = field(default_factory=BoundaryStats)
    stream_units: list[StreamUnit] = field(default_factory=list)
    host_experts: list[HostExperts] = field(default_factory=list)   # MoE experts of its layers run on the host

    @property
    def blocks(self) -> tuple[int, int]:
        return tuple(self.plan.blocks)  # type: ignore[return-value]

    @property
    def layer_indices(self) -> list[int]:
        return [i for i, _ in self.layers]

    def new_cache(self) -> Any:
        """An empty transformers DynamicCache for this model's layers; this stage's layers fill their
        own entries (on this stage's compute device) and leave the others empty."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config) if self.config is not None else DynamicCache()

    def _layer_type(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None) if self.config is not None else None
        return types[index] if types and index < len(types) else "full_attention"

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run this stage's repeated layers: ``hidden_states`` [batch, tokens, hidden] in, the same
        shape out, on this stage's compute device. ``args`` / ``kwargs`` are what the model passes each
        layer (an ``attention_mask`` or ``position_embeddings`` given as a dict keyed by layer type,
        as hybrid-attention models build them, is resolved per layer)."""
        import torch

        if not self.layers:
            raise ValueError(f"stage {self.index} holds no repeated layers")
        with torch.no_grad():
            for idx, layer in self.layers:
                kw = dict(kwargs)
                for key in ("attention_mask", "position_embeddings"):
                    if isinstance(kw.get(key), dict):
                        kw[key] = kw[key][self._layer_type(idx)]
                out = layer(hidden_states, *args, **kw)
                hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states

    __call__ = forward


def add_boundary_hooks(stages: list[Any], caches: list[Any], handles: list[Any],
                       entered: Callable[[int], Callable] | None = None) -> None:
    """A BoundaryHook before each stage's first unit (the activations cross to its device), and
    before every unit of a stage whose device is not the first stage's (its inputs move too);
    ``entered(stage index)``, when given, is a second pre-hook on each stage's first unit.
    Stages: ``index``, ``units`` [(prefix, module)], ``compute_device``, ``stats``. Handles are
    appended to ``handles`` for detach."""
    first = stages[0].compute_device
    for st in stages:
        move = st.compute_device != first
        for j, (_, mod) in enumerate(st.units):
            entry = j == 0
            if st.index == 0 or not (entry or move):
                continue
            hook = BoundaryHook(st.compute_device, caches[st.index], st.stats, entry=entry, move=move)
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
            if entry and entered is not None:
                handles.append(mod.register_forward_pre_hook(entered(st.index), with_kwargs=True))


def _cpu_layer_experts(model: nn.Module, stages: list[RuntimeStage], host: set[int]) -> list[nn.Module]:
    """The MoE experts modules of layers that may run whole on the host (a stage computing on the CPU,
    or a phase stage, whose decode runs there), other than those kept in host RAM for a GPU layer."""
    from .experts import runs_host_path

    if not any(s.compute_device.type == "cpu" or s.mode == "phase" for s in stages):
        return []
    return [m for m in model.modules() if id(m) not in host and runs_host_path(m)]


class SplitRuntime:
    """Everything that makes ``model`` run split: attach() installs the hooks, detach() removes them."""

    def __init__(self, model: nn.Module, plan: Plan, layout: StageLayout, stages: list[RuntimeStage],
                 engines: list[StreamEngine] | None = None, checkpoints: list[Checkpoint] | None = None,
                 offload_dir: str | None = None, notes: list[str] | None = None,
                 cleanup_offload_dir: bool = False):
        self.model = model
        self.plan = plan
        # how the KV cache is stored (runtime/kvcache.py): the plan's --kv-dtype; a loader may set a
        # format its plan budgets otherwise (GGUF: float16); None = the compute dtype
        self.kv_dtype: str | None = plan.workload.kv_dtype
        self.layout = layout
        self.stages = stages
        self.engines = list(engines or [])
        self.checkpoints = list(checkpoints or [])
        self.offload_dir = offload_dir
        self.cleanup_offload_dir = cleanup_offload_dir
        self.offload_files: list[str] = []   # offload files written into a caller's folder (removed at detach)
        self.notes = list(notes or [])
        self.current_stage: int | None = None
        self.forwards = 0
        self._handles: list[Any] = []
        self._caches = [StageInputCache() for _ in stages]
        self._kv = CacheBytes()          # the cache the last forward returned, measured
        self.attached = False
        self._multi_device = len({str(s.compute_device) for s in stages}) > 1
        from .experts import ExpertsHooks
        from .stream import PhaseStats

        self.phase_stats = PhaseStats()    # forwards of "phase" stages on the GPU / on the host
        from ..plan.plan import PHASE_PREFILL_TOKENS

        host = [ex for s in stages for ex in s.host_experts]
        self.experts_hooks = ExpertsHooks(host, prefill_tokens=PHASE_PREFILL_TOKENS,
                                          cpu_layers=_cpu_layer_experts(model, stages, {id(ex.module) for ex in host}))

    # -- hooks --------------------------------------------------------------------------------
    @property
    def input_device(self) -> torch.device:
        return self.stages[0].compute_device

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        self.current_stage = 0
        self.forwards += 1
        dev = self.input_device
        return move_tensors(args, dev), move_tensors(kwargs, dev)

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        import torch

        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self._kv = cache_layer_bytes(cache)
        dev = self.input_device
        if self._multi_device and hasattr(output, "keys"):
            # logits, hidden states and the like where the caller's inputs are (the cache stays put)
            for k in list(output.keys()):
                output[k] = move_tensors(output[k], dev)
        elif isinstance(output, torch.Tensor) and output.device != dev:
            output = output.to(dev)
        return output

    def _entered(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            self.current_stage = index
        return hook

    def attach(self) -> SplitRuntime:
        if self.attached:
            return self
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        h.append(self.model.register_forward_hook(self._root_post, with_kwargs=True))
        add_boundary_hooks(self.stages, self._caches, h, entered=self._entered)
        for eng in self.engines:
            for unit in eng.units:
                if self.stages[unit.stage].mode == "phase":   # prefill streamed here, decode on the host
                    self._phase_hook(unit, eng).attach(h)
                    continue
                h.append(unit.module.register_forward_pre_hook(
                    lambda m, a, u=unit, e=eng: e.ensure(u)))
                h.append(unit.module.register_forward_hook(
                    lambda m, a, o, u=unit, e=eng: e.release(u)))
        self.experts_hooks.attach()
        self.attached = True
        return self

    def _phase_hook(self, unit: StreamUnit, engine: StreamEngine) -> PhaseHook:
        from ..plan.plan import PHASE_PREFILL_TOKENS
        from .stream import PhaseHook

        st = self.stages[unit.stage]
        layer = next((i for i, m in st.layers if m is unit.module), None)
        return PhaseHook(unit, engine, st.device, layer, PHASE_PREFILL_TOKENS, self.phase_stats)

    def detach(self) -> None:
        """Remove every hook; close the stream engines and checkpoint files. The weights stay where
        they are (streamed ones at their host home, disk-tier ones as meta placeholders)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.experts_hooks.detach()
        for c in self._caches:
            c.clear()
        self._sync()
        for eng in self.engines:
            eng.close()
        self.engines = []
        for ck in self.checkpoints:
            ck.close()
        self.checkpoints = []
        from .scratch import release

        if self.cleanup_offload_dir and self.offload_dir:
            release(self.offload_dir)
            self.offload_dir = None
        for path in self.offload_files:
            release(path)
        self.offload_files = []
        self.attached = False
        if getattr(self.model, "vramancer", None) is self:
            del self.model.vramancer

    def free(self) -> None:
        """Detach and drop every weight (parameters and buffers become meta); frees device memory."""
        self.detach()
        for st in self.stages:
            st.stream_units = []
        free_module(self.model)

    def _sync(self) -> None:
        import torch

        if torch.cuda.is_available() and any(s.compute_device.type == "cuda" for s in self.stages):
            torch.cuda.synchronize()

    def stage_of_device_error(self) -> RuntimeStage | None:
        if self.current_stage is None:
            return None
        return self.stages[self.current_stage]

    # -- memory ---------------------------------------------------------------------------------
    def stage_bytes(self, cache: CacheBytes | None = None) -> RuntimeBytes:
        """Bytes held now per stage and per stream buffer (``memory.stage_bytes``), with the KV
        cache ``cache`` (default: the one the last forward returned)."""
        return stage_bytes(self.plan, self.stages, self.engines, self._kv if cache is None else cache)

    def memory_report(self, cache: Any = None) -> MemoryReport:
        """Measured bytes per stage next to the plan's. KV bytes come from ``cache`` when given, else
        from the cache the last forward returned (after ``generate``, the generation's cache)."""
        import torch

        kv = cache_layer_bytes(cache) if cache is not None else self._kv
        held = self.stage_bytes(kv)
        peaks: dict[str, int] = {}
        if torch.cuda.is_available():
            for st in self.stages:
                d = st.compute_device
                if d.type == "cuda" and str(d) not in peaks:
                    peaks[str(d)] = int(torch.cuda.max_memory_allocated(d))
        out: list[StageMemoryReport] = []
        for st, sb in zip(self.stages, held.stages, strict=True):
            out.append(StageMemoryReport(
                stage=st.index, device=st.plan.device, kind=st.plan.kind, mode=st.mode,
                blocks=st.blocks, torch_device=str(st.device), compute_device=str(st.compute_device),
                weights_bytes=sb.weights_bytes, planned_weights_bytes=st.plan.weights_bytes,
                kv_cache_bytes=sb.kv_cache_bytes, planned_kv_cache_bytes=st.plan.kv_cache_bytes,
                buffers_bytes=sb.buffers_bytes, allocator_peak_bytes=peaks.get(str(st.compute_device)),
                misplaced=list(sb.misplaced), kv_devices=list(sb.kv_devices), compute_device_id=sb.compute_device))
        return MemoryReport(out, kv_tokens=kv.tokens, batch=kv.batch, notes=list(self.notes),
                            stream_buffers=held.stream_buffers, experts=experts_bytes(self.stages))

    def samplers(self, real: bool = True) -> list:
        """Telemetry samplers for this split model: its simulated devices through a
        SimulatedSampler fed by the per-stage accounting (weights, KV cache held, stream slots),
        and with ``real`` the real devices it uses (and those behind the simulated ones)::

            with vramancer.track(0.1, samplers=model.vramancer.samplers()) as rec:
                with rec.phase("generate"):
                    model.generate(...)
        """
        from .telemetry_feed import StageFeed

        return StageFeed(self.plan).attach(self).samplers(real=real)

    def boundary_stats(self) -> list[dict]:
        return [dict(stage=s.index, **s.stats.to_dict()) for s in self.stages]

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.plan.device}[{s.blocks[0]}:{s.blocks[1]}]"
                          + {"stream": "*", "phase": "~"}.get(s.mode, "")
                          + (f"+{len(s.host_experts)} experts on host" if s.host_experts else "")
                          for s in self.stages)
        return f"SplitRuntime({parts})"
