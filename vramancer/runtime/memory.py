"""What a split model holds, measured in one place (``stage_bytes``) for both the memory report and
the live view: per stage its weights (parameter bytes of the modules it holds; for a streamed stage
the bytes of its streamed parameters, which live at home in host RAM or on disk), buffers and KV
cache (bytes of the cache tensors of its layers); per compute device that streams, the stream
buffer its engine allocated. ``MemoryReport`` sets these next to the plan's figures, with the CUDA
caching allocator's peak per device."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..plan.plan import Plan

__all__ = ["StageMemoryReport", "StreamBufferBytes", "ExpertsBytes", "experts_bytes",
           "MemoryReport", "CacheBytes", "StageBytes", "RuntimeBytes",
           "cache_layer_bytes", "stage_bytes", "tensor_bytes", "short_bytes"]


def short_bytes(n: int) -> str:
    """Compact sizes for table cells: "47.2M", "212.0K", "1.5G", "0" (``units.format_bytes``)."""
    return format_bytes(n, compact=True)


def tensor_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if hasattr(t, "quant_state") or hasattr(t, "SCB") or hasattr(t, "tensor_data_names"):
        # a bitsandbytes weight (its scales count too) or a torchao tensor subclass (its inner tensors)
        from .quant import quantized_param_bytes

        return quantized_param_bytes(t)
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheBytes:
    """A transformers cache measured: ``layer_bytes[i]`` bytes of K and V of layer i,
    ``layer_devices[i]`` the torch device holding them (None for a layer never written), the
    ``tokens`` it has seen and its ``batch``."""

    layer_bytes: tuple[int, ...] = ()
    tokens: int = 0
    batch: int = 0
    layer_devices: tuple[str | None, ...] = ()

    def bytes_of(self, layers: Sequence[int]) -> int:
        return sum(self.layer_bytes[i] for i in layers if i < len(self.layer_bytes))

    def devices_of(self, layers: Sequence[int]) -> list[str]:
        return sorted({d for i in layers if i < len(self.layer_devices) for d in (self.layer_devices[i],) if d})


def _cache_layers(cache: Any) -> list[Any]:
    """The per-layer entries of a transformers Cache (self-attention part of an encoder-decoder one)."""
    if cache is None:
        return []
    inner = getattr(cache, "self_attention_cache", None)
    if inner is not None:
        cache = inner
    return list(getattr(cache, "layers", None) or [])


def cache_layer_bytes(cache: Any) -> CacheBytes:
    """``cache`` measured; a layer never written holds 0 bytes on no device."""
    import torch

    out: list[int] = []
    devices: list[str | None] = []
    batch = 0
    for layer in _cache_layers(cache):
        n = 0
        dev = None
        for name in ("keys", "values", "key_scales", "value_scales"):   # scales: --kv-dtype q8_0 (kvcache.py)
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                n += tensor_bytes(t)
                if t.numel():
                    dev = str(t.device)
                if t.dim() == 4 and t.numel():
                    batch = max(batch, t.shape[0])
        out.append(n)
        devices.append(dev)
    try:
        tokens = int(cache.get_seq_length()) if cache is not None and out else 0
    except Exception:  # noqa: BLE001 - a cache type without a length: report 0 tokens
        tokens = 0
    return CacheBytes(tuple(out), tokens, batch, tuple(devices))


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageBytes:
    """One stage now. ``device``: the plan device where its weights live; ``compute_device``: the
    one where it runs and keeps its buffers and KV cache (the same unless the stage streams).
    ``misplaced``: parameters not on the stage's torch device (should be none); ``kv_devices``: the
    torch devices holding its layers' KV cache (should be its compute device alone)."""

    stage: int
    device: str
    compute_device: str
    weights_bytes: int
    buffers_bytes: int = 0
    kv_cache_bytes: int = 0
    misplaced: tuple[str, ...] = ()
    kv_devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class StreamBufferBytes:
    """The stream buffer on plan device ``device``: allocated bytes (both slots) next to the plan's,
    and the stages streamed through it."""

    device: str
    buffer_bytes: int
    planned_buffer_bytes: int
    stages: tuple[int, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d


@dataclass(frozen=True)
class ExpertsBytes:
    """One MoE layer's routed experts in host RAM (runtime/experts.py): block ``block``, module
    ``module``, on plan device ``device`` (torch device ``torch_device``): measured bytes next to
    the plan's. ``misplaced``: its parameters not on ``torch_device`` (should be none)."""

    block: int
    module: str
    device: str
    torch_device: str
    weights_bytes: int
    planned_weights_bytes: int
    misplaced: tuple[str, ...] = ()

    @property
    def over_plan(self) -> bool:
        return self.weights_bytes > self.planned_weights_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["misplaced"] = list(self.misplaced)
        d["over_plan"] = self.over_plan
        return d


def experts_bytes(stages: Sequence[Any]) -> list[ExpertsBytes]:
    """Per MoE experts module kept in host RAM (``RuntimeStage.host_experts``), the bytes it holds."""
    out = []
    for st in stages:
        for ex in getattr(st, "host_experts", ()):
            n, bad = 0, []
            for name, p in ex.module.named_parameters(prefix=ex.name):
                n += tensor_bytes(p)
                if p.device != ex.device:
                    bad.append(name)
            out.append(ExpertsBytes(ex.block, ex.name, ex.plan_device, str(ex.device), n, ex.planned_bytes,
                                    tuple(bad)))
    return out


@dataclass(frozen=True)
class RuntimeBytes:
    stages: list[StageBytes]
    stream_buffers: list[StreamBufferBytes]


def stage_bytes(plan: Plan, stages: Sequence[Any], engines: Sequence[Any], cache: CacheBytes) -> RuntimeBytes:
    """The bytes a split model holds now, per stage and per stream buffer. ``stages``: the runtime's
    stages (``RuntimeStage``: units, stream units, layer indices, devices); ``engines``: its stream
    engines; ``cache``: the KV cache to count (``CacheBytes()`` for none). Each tensor counts once
    per stage; tied copies count on every stage that holds one."""
    out: list[StageBytes] = []
    for st in stages:
        # MoE experts in host RAM are not the stage's (see experts_bytes)
        seen: set[int] = {id(t) for ex in getattr(st, "host_experts", ()) for t in ex.module.parameters()}
        weights = buffers = 0
        misplaced: list[str] = []
        if st.mode in ("stream", "phase"):
            keys: set[str] = set()
            for u in st.stream_units:
                for p in u.params:
                    if p.key not in keys:
                        keys.add(p.key)
                        weights += p.nbytes
        for prefix, mod in st.units:
            if st.mode not in ("stream", "phase"):
                for name, p in mod.named_parameters(prefix=prefix):
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    weights += tensor_bytes(p)
                    if p.device != st.device:
                        misplaced.append(name)
            for b in mod.buffers():
                if id(b) in seen:
                    continue
                seen.add(id(b))
                buffers += tensor_bytes(b)
        layers = st.layer_indices
        out.append(StageBytes(st.index, st.plan.device, st.plan.compute_device, weights, buffers,
                              cache.bytes_of(layers), tuple(misplaced), tuple(cache.devices_of(layers))))
    allocated = {e.plan_device: e.buffer_bytes for e in engines}
    bufs = [StreamBufferBytes(b.device, allocated.get(b.device, 0), b.buffer_bytes, tuple(b.stages))
            for b in plan.stream_buffers]
    return RuntimeBytes(out, bufs)


# ------------------------------------------------------------------------------------------------
@dataclass
class StageMemoryReport:
    """One stage, measured next to the plan. ``weights_bytes`` counts each tensor once per stage
    (tied copies on each stage that uses them). For a streamed stage the weights live on ``device``
    (host RAM or disk) and run on ``compute_device``; the slots they stream through are the
    report's ``stream_buffers``. ``allocator_peak_bytes`` is the CUDA caching allocator's peak on
    the stage's compute device (shared by stages on one device). ``misplaced``: parameters not on
    the stage's device (should be empty); ``kv_devices``: the devices holding its layers' KV cache
    (should be its compute device alone). ``torch_device`` / ``compute_device`` are torch devices;
    ``compute_device_id`` is the plan's id of the compute device."""

    stage: int
    device: str
    kind: str
    mode: str
    blocks: tuple[int, int]
    torch_device: str
    compute_device: str
    weights_bytes: int
    planned_weights_bytes: int
    kv_cache_bytes: int
    planned_kv_cache_bytes: int
    buffers_bytes: int = 0
    allocator_peak_bytes: int | None = None
    misplaced: list[str] = field(default_factory=list)
    kv_devices: list[str] = field(default_factory=list)   # where this stage's KV tensors are
    compute_device_id: str = ""

    @property
    def over_plan(self) -> bool:
        """Measured more than the plan said: a bug in the memory model (KV compared at the plan's context)."""
        return self.weights_bytes > self.planned_weights_bytes or self.kv_cache_bytes > self.planned_kv_cache_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        d["over_plan"] = self.over_plan
        return d


@dataclass
class MemoryReport:
    stages: list[StageMemoryReport]
    kv_tokens: int = 0
    batch: int = 0
    notes: list[str] = field(default_factory=list)
    stream_buffers: list[StreamBufferBytes] = field(default_factory=list)
    experts: list[ExpertsBytes] = field(default_factory=list)   # MoE experts in host RAM, per layer

    @property
    def weights_bytes(self) -> int:
        return sum(s.weights_bytes for s in self.stages)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(s.kv_cache_bytes for s in self.stages)

    def weights_bytes_by_device(self) -> dict[str, int]:
        """Weight bytes measured on each plan device: its stages' and the MoE experts kept there
        (compare with ``Plan.weights_bytes_by_device``)."""
        held: dict[str, int] = {}
        for s in self.stages:
            held[s.device] = held.get(s.device, 0) + s.weights_bytes
        for e in self.experts:
            held[e.device] = held.get(e.device, 0) + e.weights_bytes
        return held

    @property
    def stream_buffers_over_plan(self) -> list[StreamBufferBytes]:
        return [b for b in self.stream_buffers if b.buffer_bytes > b.planned_buffer_bytes]

    def to_dict(self) -> dict:
        return {"kv_tokens": self.kv_tokens, "batch": self.batch, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "stages": [s.to_dict() for s in self.stages],
                "stream_buffers": [b.to_dict() for b in self.stream_buffers], "notes": list(self.notes),
                **({"experts": [e.to_dict() for e in self.experts]} if self.experts else {})}

    def rows(self) -> list[list[str]]:
        """Table rows for people, matching ``HEADER``."""
        rows = []
        for s in self.stages:
            where = s.device if s.mode == "execute" else f"{s.device}->{s.compute_device_id or s.compute_device}"
            rows.append([
                str(s.stage), where, f"{s.blocks[0]}-{s.blocks[1] - 1}",
                short_bytes(s.weights_bytes), short_bytes(s.planned_weights_bytes),
                short_bytes(s.kv_cache_bytes), short_bytes(s.planned_kv_cache_bytes),
                "-" if s.allocator_peak_bytes is None else short_bytes(s.allocator_peak_bytes),
            ])
        return rows

    HEADER = ["#", "device", "blocks", "weights", "plan", "KV", "plan", "CUDA peak"]

    def buffer_lines(self) -> list[str]:
        """One line per stream buffer: measured (plan), the stages it serves."""
        return [f"stream buffer on {b.device}: {short_bytes(b.buffer_bytes)} "
                f"(plan {short_bytes(b.planned_buffer_bytes)}) for stage{'s' if len(b.stages) > 1 else ''} "
                f"{', '.join(str(i) for i in b.stages)}" for b in self.stream_buffers]

    def table(self) -> str:
        rows = [self.HEADER] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += self.buffer_lines()
        if self.experts:
            by_dev: dict[str, list[ExpertsBytes]] = {}
            for e in self.experts:
                by_dev.setdefault(e.device, []).append(e)
            for dev, es in by_dev.items():
                held = short_bytes(sum(e.weights_bytes for e in es))
                lines.append(f"MoE experts of {len(es)} layers on {dev}: {held} "
                             f"(plan {short_bytes(sum(e.planned_weights_bytes for e in es))})")
        if self.kv_tokens:
            lines.append(f"KV cache holds {self.kv_tokens} tokens x batch {self.batch}; plan sized for its context")
        return "\n".join(lines + self.notes)
