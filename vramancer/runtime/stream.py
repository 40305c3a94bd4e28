"""Streamed offload: weights that live in host RAM (the cpu tier) or in a safetensors file (the disk
tier) are copied to the compute device just before their unit runs, into one of two slot buffers,
while the next streamed unit is copied into the other slot (prefetch, double buffering).

On CUDA the copies run on a side stream from pinned host memory (disk reads land in a pinned staging
buffer first, on a worker thread) and the compute stream waits on an event; a slot is overwritten
only after the compute stream recorded that it is done with it. On a CPU compute device the same
schedule runs with the worker thread doing the copies and file reads (both release the GIL), so the
code path and the overlap are exercised without a GPU.

A unit's parameters point at its slot only while it runs; before and after, they point at their
home (the host tensor, or a ``meta`` placeholder for the disk tier).

The slots are as large as the plan's stream buffer says (``StreamBuffer.slot_bytes``: the largest
streamed block); a unit's parameters are packed into its slot without padding (largest element
size first, so every offset is a multiple of each later parameter's element size), so a block's
unit never needs more than the block's weight bytes.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .checkpoint import Checkpoint

__all__ = ["StreamParam", "StreamUnit", "StreamEngine", "PhaseHook", "PhaseStats", "forward_tokens"]


@dataclass
class StreamParam:
    """One parameter of a streamed unit. ``home``: the host tensor (cpu tier), or None with
    ``file_key`` naming the tensor in ``source`` (disk tier; stored in the parameter's dtype)."""

    owner: nn.Module
    attr: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    home: torch.Tensor | None = None
    source: Checkpoint | None = None
    file_key: str | None = None
    slot_offset: int = 0
    home_param: nn.Parameter | None = None
    key: str = ""          # identity for accounting: params sharing a home share a key


@dataclass
class StreamUnit:
    name: str
    module: nn.Module
    stage: int
    params: list[StreamParam] = field(default_factory=list)
    slot_bytes: int = 0

    def layout(self) -> None:
        """Offsets in a slot: parameters by element size, largest first, back to back."""
        off = 0
        for p in sorted(self.params, key=lambda p: -p.dtype.itemsize):
            p.slot_offset = off
            off += p.nbytes
        self.slot_bytes = off


class _Slot:
    def __init__(self, index: int, nbytes: int, device: torch.device, pinned_staging: bool):
        import torch

        self.index = index
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        self.staging = (torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                        if pinned_staging else None)
        self.unit: StreamUnit | None = None
        self.pending: Future | None = None
        self.ready_event: Any = None     # cuda: copy into this slot finished (side stream)
        self.free_event: Any = None      # cuda: compute stream finished with this slot
        self.params: dict[str, list[Any]] = {}   # unit name -> Parameters viewing this slot

    def view(self, p: StreamParam, base: torch.Tensor | None = None) -> torch.Tensor:
        buf = self.buffer if base is None else base
        return buf[p.slot_offset: p.slot_offset + p.nbytes].view(p.dtype).view(p.shape)


class StreamEngine:
    """Streams ``units`` (in run order) onto ``device`` through two slots of ``slot_bytes`` each (the
    plan's; more only if a unit needs more, which the memory report then shows over plan).
    ``plan_device``: the plan's id of the compute device (its stream buffer's)."""

    def __init__(self, units: list[StreamUnit], device: torch.device, slot_bytes: int = 0, plan_device: str = ""):
        import torch

        self.device = device
        self.plan_device = plan_device or str(device)
        self.units = units
        self.cuda = device.type == "cuda"
        for u in units:
            u.layout()
        self.slot_bytes = max([slot_bytes] + [u.slot_bytes for u in units])
        has_disk = any(p.home is None for u in units for p in u.params)
        self.slots = [_Slot(i, self.slot_bytes, device, self.cuda and has_disk) for i in range(2)]
        self.next_unit: dict[str, StreamUnit] = {
            u.name: units[(i + 1) % len(units)] for i, u in enumerate(units)}
        self.side_stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramancer-stream")
        self.current: _Slot | None = None
        self.copied_bytes = 0
        self.loads = 0
        self.prefetch_hits = 0

    @property
    def buffer_bytes(self) -> int:
        """Device bytes the slots take (both)."""
        return sum(s.buffer.numel() for s in self.slots)

    # -- filling a slot -----------------------------------------------------------------------
    def _fill(self, slot: _Slot, unit: StreamUnit) -> None:
        """Runs on the worker thread: copy ``unit``'s weights into ``slot``."""
        import torch

        if not self.cuda:
            for p in unit.params:
                dst = slot.view(p)
                if p.home is not None:
                    dst.copy_(p.home)
                else:
                    raw = slot.buffer[p.slot_offset: p.slot_offset + p.nbytes]
                    p.source.read_into(p.file_key, raw)
                self.copied_bytes += p.nbytes
            return
        stream = self.side_stream
        if slot.ready_event is not None:       # the staging buffer is free once the last copy from it ended
            slot.ready_event.synchronize()
        for p in unit.params:
            if p.home is None:
                p.source.read_into(p.file_key, slot.staging[p.slot_offset: p.slot_offset + p.nbytes])
        with torch.cuda.stream(stream):
            if slot.free_event is not None:
                stream.wait_event(slot.free_event)
            for p in unit.params:
                src = p.home if p.home is not None else slot.view(p, slot.staging)
                slot.view(p).copy_(src, non_blocking=True)
                self.copied_bytes += p.nbytes
            ev = torch.cuda.Event()
            ev.record(stream)
            slot.ready_event = ev

    def _start(self, slot: _Slot, unit: StreamUnit) -> None:
        if slot.pending is not None:
            slot.pending.result()
        slot.unit = unit
        slot.pending = self.pool.submit(self._fill, slot, unit)
        self.loads += 1

    def _slot_of(self, unit: StreamUnit) -> _Slot | None:
        for s in self.slots:
            if s.unit is unit:
                return s
        return None

    def _other(self, slot: _Slot | None) -> _Slot:
        if slot is None:
            return self.slots[0]
        return self.slots[1 - slot.index]

    # -- hooks --------------------------------------------------------------------------------
    def ensure(self, unit: StreamUnit) -> None:
        """Before ``unit`` runs: its weights in a slot (waiting for a prefetch in flight), its
        parameters pointing there, and the next streamed unit started into the other slot."""
        import torch

        slot = self._slot_of(unit)
        if slot is None:
            slot = self._other(self.current)
            self._start(slot, unit)
        else:
            self.prefetch_hits += 1
        if slot.pending is not None:
            slot.pending.result()
            slot.pending = None
        if self.cuda and slot.ready_event is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready_event)
        self._bind(slot, unit)
        self.current = slot
        nxt = self.next_unit[unit.name]
        if nxt is not unit and self._slot_of(nxt) is None:
            self._start(self._other(slot), nxt)

    def _bind(self, slot: _Slot, unit: StreamUnit) -> None:
        import torch
        from torch import nn

        params = slot.params.get(unit.name)
        if params is None:
            params = [nn.Parameter(slot.view(p), requires_grad=False) for p in unit.params]
            slot.params[unit.name] = params
        with torch.no_grad():
            for p, param in zip(unit.params, params):
                setattr(p.owner, p.attr, param)

    def release(self, unit: StreamUnit) -> None:
        """After ``unit`` ran: parameters back to their home; on CUDA, mark the slot reusable once
        the compute stream gets past this point."""
        import torch

        for p in unit.params:
            setattr(p.owner, p.attr, p.home_param)
        slot = self._slot_of(unit)
        if self.cuda and slot is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            slot.free_event = ev

    def close(self) -> None:
        for s in self.slots:
            if s.pending is not None:
                try:
                    s.pending.result()
                except Exception:  # noqa: BLE001 - closing; the error surfaced where it happened
                    pass
                s.pending = None
        self.pool.shutdown(wait=True)
        for s in self.slots:
            s.params.clear()
            s.unit = None
        self.slots = []


# ------------------------------------------------------------------------------------------------
# "phase" stages (plan/phase.py): prefill streamed to the GPU, decode on the host
def forward_tokens(args: tuple, kwargs: dict) -> int:
    """Tokens in a layer's forward: batch x sequence of its hidden states ([batch, tokens, hidden])."""
    import torch

    h = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(h, torch.Tensor) or h.dim() < 2:
        return 0
    return int(h.shape[0] * h.shape[1]) if h.dim() >= 3 else int(h.shape[0])


def _layer_cache(kwargs: dict, layer: int | None) -> Any:
    cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                 None)
    layers = getattr(cache, "layers", None)
    if layer is None or not layers or layer >= len(layers):
        return None
    return layers[layer]


def _move_layer_cache(entry: Any, device: torch.device) -> int:
    """Move one cache layer's tensors (keys, values) to ``device``; bytes moved."""
    import torch

    moved = 0
    if entry is None:
        return 0
    for name in ("keys", "values"):
        t = getattr(entry, name, None)
        if isinstance(t, torch.Tensor) and t.device != device:
            setattr(entry, name, t.to(device))
            moved += t.numel() * t.element_size()
    if getattr(entry, "device", None) is not None:
        entry.device = device
    return moved


@dataclass
class PhaseStats:
    """Forwards of a phase stage's units: run on the GPU (prefill, weights streamed) or on the host
    (decode), and KV-cache bytes moved between them."""

    gpu_forwards: int = 0
    host_forwards: int = 0
    kv_moved_bytes: int = 0

    def to_dict(self) -> dict:
        return {"gpu_forwards": self.gpu_forwards, "host_forwards": self.host_forwards,
                "kv_moved_bytes": self.kv_moved_bytes}


class PhaseHook:
    """The hooks of one unit of a "phase" stage. A forward of at least ``prefill_tokens`` tokens runs
    on the GPU: the engine streams the unit's weights into a slot (``ensure`` / ``release``), and the
    unit's KV-cache layer comes to the GPU for it and goes back to the host after. A smaller one runs
    on the host, where the weights live: its inputs move there (the cache stays there); its output
    stays there too, the next stage's boundary moves it on."""

    def __init__(self, unit: StreamUnit, engine: StreamEngine, host: torch.device, layer: int | None,
                 prefill_tokens: int, stats: PhaseStats):
        self.unit = unit
        self.engine = engine
        self.host = host
        self.layer = layer
        self.prefill_tokens = prefill_tokens
        self.stats = stats
        self._on_gpu = False

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        from .boundary import move_tensors

        self._on_gpu = forward_tokens(args, kwargs) >= self.prefill_tokens
        if self._on_gpu:
            self.engine.ensure(self.unit)
            self.stats.gpu_forwards += 1
            self.stats.kv_moved_bytes += _move_layer_cache(_layer_cache(kwargs, self.layer), self.engine.device)
            return args, kwargs
        self.stats.host_forwards += 1
        return move_tensors(args, self.host), move_tensors(kwargs, self.host)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self._on_gpu:
            self.engine.release(self.unit)
            self.stats.kv_moved_bytes += _move_layer_cache(_layer_cache(kwargs, self.layer), self.host)
        return output

    def attach(self, handles: list[Any]) -> None:
        m = self.unit.module
        handles.append(m.register_forward_pre_hook(self.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(self.post, with_kwargs=True))
