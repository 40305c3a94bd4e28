"""Memory per stage of a split run as telemetry samples, for the devices only the plan knows.

A simulated GPU ("rtx3090#0") has no driver to ask: its bytes are the runtime's accounting. The
``StageFeed`` turns that accounting into one ``DeviceSample`` per simulated device per tick, for a
``SimulatedSampler``; real devices (cuda:N, the CPU) are sampled by the NVML / torch / host samplers.

    used_bytes  = weights of the stages whose weights live there
                + buffers and KV cache held now of the stages that run there
                + its stream buffer (both slots), if stages stream to it
    total_bytes = the simulated device's capacity (from the plan)

Where each stage's bytes are is the plan's word (``Stage.device``, ``Stage.compute_device``,
``Plan.stream_buffers``); the bytes are the runtime's one count (``SplitRuntime.stage_bytes``,
which the memory report uses too).

While the model loads (``watch_load``) the weights count as each tensor lands on its stage; once
loaded (``attach``) the counts come from the SplitRuntime. The KV cache counts while the cache a
forward returned is alive (during ``generate``), and 0 once it is dropped.

    feed = StageFeed(plan)
    with vramancer.track(0.1, samplers=feed.samplers()) as rec:
        with rec.phase("load"), feed.watch_load(folder):
            model = vramancer.load(folder, plan=plan)
        feed.attach(model.vramancer)
        with rec.phase("generate"):
            model.generate(...)

or, for a model already loaded, ``vramancer.track(0.1, samplers=model.vramancer.samplers())``.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import DeviceSpecError
from ..telemetry.samples import DeviceSample
from .memory import CacheBytes, RuntimeBytes, StageBytes, cache_layer_bytes

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..devices.device import Device
    from ..plan.plan import Plan

__all__ = ["StageBytes", "StageFeed", "SIMULATED_MISSING"]   # StageBytes: memory.py's, for readers of the feed

log = logging.getLogger(__name__)

# What a simulated device cannot report; the views say "n/a (simulated)".
SIMULATED_MISSING = ("utilization_pct", "power_w", "temperature_c", "sm_clock_mhz", "mem_clock_mhz")


def _unique_bytes(tensors: Iterator[Any]) -> int:
    """Bytes of the distinct, materialised tensors (meta ones hold nothing)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


class _LoadWatch:
    """Counts the weights that have landed on each stage while ``load`` runs.

    torch's global module / parameter registration hooks (public API) see the model being built
    and each tensor the loader assigns. The model is recognised at the first real (non-meta)
    parameter assigned to a module that already has a parent (while a model is built, each module
    registers its parameters before it is attached) and whose root holds every module the plan's
    blocks name; from then on a tick sums the parameters and buffers on each stage."""

    def __init__(self, plan: Plan, model: Any):
        self.plan = plan
        self.model = model
        self._parents: dict[int, tuple[Any, Any]] = {}     # id(child) -> (child, parent) while building
        self._root: weakref.ref[nn.Module] | None = None
        self._stage_of: dict[str, int] = {}
        self._handles: list[Any] = []
        self.failed: str | None = None

    # -- recognising the model ------------------------------------------------------------------
    def adopt(self, root: nn.Module) -> bool:
        """Watch ``root`` if it is the model the plan is for (it has every module the plan's blocks
        name); False if it is not (yet)."""
        from .layout import layout_from_plan, stage_layout

        if not _is_module(self.model):     # a module being built: it may not have them all yet
            for b in self.plan.blocks:
                for p in b.modules:
                    try:
                        root.get_submodule(p)
                    except AttributeError:
                        return False
        self._stage_of = dict(stage_layout(root, layout_from_plan(self.plan, root), self.plan).tensor_stage)
        self._root = weakref.ref(root)
        self._parents.clear()
        return True

    def _on_module(self, parent: Any, name: str, child: Any) -> None:
        if child is not None and self._root is None:
            self._parents[id(child)] = (child, parent)

    def _on_param(self, module: Any, name: str, param: Any) -> None:
        if self._root is not None or self.failed or param is None or param.device.type == "meta":
            return
        if id(module) not in self._parents:
            return              # a module registering its own parameters while it is built
        root, seen = module, set()
        while id(root) in self._parents and id(root) not in seen:
            seen.add(id(root))
            root = self._parents[id(root)][1]
        try:
            self.adopt(root)
        except Exception as e:  # noqa: BLE001 - watching must never break the load it watches
            self.failed = f"{type(e).__name__}: {e}"
            log.debug("load watch gave up: %s", self.failed)

    def start(self) -> _LoadWatch:
        from torch.nn.modules import module as torch_module

        if _is_module(self.model):
            try:
                self.adopt(self.model)
            except Exception as e:  # noqa: BLE001 - as in _on_param
                self.failed = f"{type(e).__name__}: {e}"
                log.debug("load watch gave up: %s", self.failed)
            return self
        self._handles = [
            torch_module.register_module_module_registration_hook(self._on_module),
            torch_module.register_module_parameter_registration_hook(self._on_param),
        ]
        return self

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._parents.clear()

    # -- counting -------------------------------------------------------------------------------
    def stage_bytes(self) -> RuntimeBytes:
        """Weights and buffers landed per stage (no KV cache, no stream buffer yet while loading)."""
        root = self._root() if self._root is not None else None
        n = len(self.plan.stages)
        params: list[list[Any]] = [[] for _ in range(n)]
        buffers: list[list[Any]] = [[] for _ in range(n)]
        if root is not None:
            for name, p in root.named_parameters(remove_duplicate=False):
                si = self._stage_of.get(name)
                if si is not None:
                    params[si].append(p)
            for name, b in root.named_buffers(remove_duplicate=False):
                si = self._stage_of.get(name)
                if si is not None:
                    buffers[si].append(b)
        out = []
        for si, st in enumerate(self.plan.stages):
            # a streamed stage keeps its weights at home (host RAM or disk) until it runs
            weights = _unique_bytes(iter(params[si]))
            out.append(StageBytes(si, st.device, st.compute_device or st.device, weights,
                                  _unique_bytes(iter(buffers[si]))))
        return RuntimeBytes(out, [])


def _is_module(obj: Any) -> bool:
    try:
        from torch import nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, nn.Module)


class StageFeed:
    """The per-stage accounting of one split run, as DeviceSamples for its simulated devices.
    Calling the feed (``feed()``) returns the samples of this instant; thread-safe."""

    def __init__(self, plan: Plan):
        self.plan = plan
        by_id = {d.id: d for d in plan.devices}
        used: list[str] = []
        for st in plan.stages:
            for dev in (st.device, st.compute_device or st.device):
                if dev not in used:
                    used.append(dev)
        for buf in plan.stream_buffers:
            if buf.device not in used:
                used.append(buf.device)
        for blk in plan.blocks:   # the host holding MoE experts
            if blk.experts_device is not None and blk.experts_device not in used:
                used.append(blk.experts_device)
        self.devices: dict[str, Device] = {i: by_id[i] for i in used if i in by_id}
        self.simulated: list[str] = [i for i in used if i in by_id and by_id[i].simulated]
        self._lock = threading.Lock()
        self._watch: _LoadWatch | None = None
        self._runtime: Any = None
        self._hook: Any = None
        self._kv: tuple[weakref.ref | None, CacheBytes] = (None, CacheBytes())   # (live cache, its bytes)

    # -- load -------------------------------------------------------------------------------------
    @contextmanager
    def watch_load(self, model: Any) -> Iterator[StageFeed]:
        """Count weights per stage while ``model`` (what is passed to ``load``: a transformers
        folder, a name resolved to one, or an nn.Module) loads in this block."""
        watch = _LoadWatch(self.plan, model)
        with self._lock:
            self._watch = watch
        watch.start()
        try:
            yield self
        finally:
            watch.stop()

    # -- run --------------------------------------------------------------------------------------
    def attach(self, runtime: Any) -> StageFeed:
        """Count from ``runtime`` (the loaded model's ``model.vramancer``) from now on."""
        if self._runtime is runtime:
            return self
        self.detach()
        handle = runtime.model.register_forward_hook(self._after_forward, with_kwargs=True)
        with self._lock:
            self._runtime = runtime
            self._hook = handle
            self._watch = None
        return self

    def detach(self) -> None:
        with self._lock:
            hook, self._hook, self._runtime = self._hook, None, None
            self._kv = (None, CacheBytes())
        if hook is not None:
            hook.remove()

    def _after_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """Note the cache this forward returned (weakly) and its bytes per layer."""
        rt = self._runtime
        if rt is None or getattr(module, "vramancer", None) is not rt:   # detached: stop watching
            self.detach()
            return
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is None:
            return
        layers = cache_layer_bytes(cache)
        try:
            ref: weakref.ref | None = weakref.ref(cache)
        except TypeError:  # a cache type without weak references: count it until the next forward
            ref = None
        with self._lock:
            self._kv = (ref, layers)

    def _kv_held(self) -> CacheBytes:
        with self._lock:
            ref, held = self._kv
        if ref is not None and ref() is None:
            return CacheBytes()     # the generation that held it is over
        return held

    def stage_bytes(self) -> RuntimeBytes:
        """Bytes per stage and stream buffer now: the runtime's count once attached (with the KV
        cache a generation holds now), else the load watch's, else 0."""
        with self._lock:
            rt, watch = self._runtime, self._watch
        if rt is None:
            if watch is not None:
                return watch.stage_bytes()
            return RuntimeBytes([StageBytes(i, st.device, st.compute_device or st.device, 0)
                                 for i, st in enumerate(self.plan.stages)], [])
        return rt.stage_bytes(self._kv_held())

    def device_samples(self) -> list[DeviceSample]:
        """One DeviceSample per simulated device of the plan (pipeline order)."""
        used = {d: 0 for d in self.simulated}
        held = self.stage_bytes()
        for sb in held.stages:
            if sb.device in used:
                used[sb.device] += sb.weights_bytes
            # a "phase" stage keeps its KV cache at home (host RAM); others where they compute
            kv_on = sb.device if self.plan.stages[sb.stage].mode == "phase" else sb.compute_device
            if kv_on in used:
                used[kv_on] += sb.kv_cache_bytes
            if sb.compute_device in used:
                used[sb.compute_device] += sb.buffers_bytes
        for buf in held.stream_buffers:
            if buf.device in used:
                used[buf.device] += buf.buffer_bytes
        with self._lock:
            rt = self._runtime
        if rt is not None:   # MoE experts the plan keeps in host RAM (runtime/experts.py)
            from .memory import experts_bytes

            for ex in experts_bytes(rt.stages):
                if ex.device in used:
                    used[ex.device] += ex.weights_bytes
        return [DeviceSample(device=d, name=self.devices[d].name, source="simulated", used_bytes=used[d],
                             total_bytes=self.devices[d].total_bytes, missing=list(SIMULATED_MISSING))
                for d in self.simulated]

    __call__ = device_samples

    # -- samplers ---------------------------------------------------------------------------------
    def real_devices(self) -> list[Any]:
        """What real samplers should watch: the plan's real devices that stages use, and the
        torch devices behind its simulated ones (where their bytes physically are)."""
        out: list[Any] = []
        for dev in self.devices.values():
            if not dev.simulated:
                out.append(dev)
            elif dev.torch_device not in out:
                out.append(dev.torch_device)
        return out

    def samplers(self, real: bool = True) -> list:
        """A SimulatedSampler over this feed (when the plan has simulated devices), and with
        ``real`` the samplers of the real devices (``default_samplers``)."""
        from ..telemetry.samplers import SimulatedSampler, default_samplers

        out: list = []
        if self.simulated:
            out.append(SimulatedSampler(self, name="vramancer-stages"))
        if real:
            wanted = []
            for dev in self.real_devices():
                try:
                    default_samplers([dev])     # only checks the item: a sampler starts when sampled
                    wanted.append(dev)
                except DeviceSpecError as e:   # nothing here samples it (a backing such as "xpu")
                    log.debug("not sampled: %s", e)
            if wanted:
                out.extend(default_samplers(wanted))
        return out

    def stage_labels(self) -> dict[str, str]:
        """Device id -> "s0", "s1+s2" (the stages whose weights or work are there)."""
        labels: dict[str, list[str]] = {}
        for i, st in enumerate(self.plan.stages):
            for dev in dict.fromkeys((st.device, st.compute_device or st.device)):
                labels.setdefault(dev, []).append(f"s{i}")
        return {d: "+".join(v) for d, v in labels.items()}

