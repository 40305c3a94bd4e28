"""Measured memory per stage next to the plan's estimate: weights (parameter bytes of the modules a
stage holds), KV cache (bytes of the cache tensors of its layers), stream slots, and on CUDA the
caching allocator's peak per device."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["StageMemoryReport", "MemoryReport", "cache_layer_bytes", "tensor_bytes", "short_bytes"]


def short_bytes(n: int) -> str:
    """Compact sizes for table cells: "47.2M", "212K", "1.5G", "0"."""
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def tensor_bytes(t: "torch.Tensor | None") -> int:
    if t is None:
        return 0
    return t.numel() * t.element_size()


def _cache_layers(cache: Any) -> list[Any]:
    """The per-layer entries of a transformers Cache (self-attention part of an encoder-decoder one)."""
    if cache is None:
        return []
    inner = getattr(cache, "self_attention_cache", None)
    if inner is not None:
        cache = inner
    return list(getattr(cache, "layers", None) or [])


def cache_layer_bytes(cache: Any) -> tuple[list[int], int, int, list[str | None]]:
    """(bytes per layer index, tokens seen, batch, device per layer) of ``cache``; a layer never
    written holds 0 bytes on no device."""
    import torch

    out: list[int] = []
    devices: list[str | None] = []
    tokens = 0
    batch = 0
    for layer in _cache_layers(cache):
        n = 0
        dev = None
        for name in ("keys", "values"):
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
    return out, tokens, batch, devices


@dataclass
class StageMemoryReport:
    """One stage. ``weights_bytes`` counts each tensor once per stage (tied copies on each stage
    that uses them). For a streamed stage the weights live on ``device`` (host RAM or disk) and
    ``stream_buffer_bytes`` are the two slots on ``compute_device``. ``allocator_peak_bytes`` is the
    CUDA caching allocator's peak on the stage's compute device (shared by stages on one device).
    ``misplaced``: parameters not on the stage's device (should be empty); ``kv_devices``: the
    devices holding its layers' KV cache (should be its compute device alone)."""

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
    stream_buffer_bytes: int = 0
    allocator_peak_bytes: int | None = None
    misplaced: list[str] = field(default_factory=list)
    kv_devices: list[str] = field(default_factory=list)   # where this stage's KV tensors are

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

    @property
    def weights_bytes(self) -> int:
        return sum(s.weights_bytes for s in self.stages)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(s.kv_cache_bytes for s in self.stages)

    def to_dict(self) -> dict:
        return {"kv_tokens": self.kv_tokens, "batch": self.batch, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "stages": [s.to_dict() for s in self.stages],
                "notes": list(self.notes)}

    def rows(self) -> list[list[str]]:
        """Table rows for people, matching ``HEADER``."""
        rows = []
        for s in self.stages:
            where = s.device if s.mode == "execute" else f"{s.device}->{s.compute_device}"
            rows.append([
                str(s.stage), where, f"{s.blocks[0]}-{s.blocks[1] - 1}",
                short_bytes(s.weights_bytes), short_bytes(s.planned_weights_bytes),
                short_bytes(s.kv_cache_bytes), short_bytes(s.planned_kv_cache_bytes),
                short_bytes(s.stream_buffer_bytes) if s.stream_buffer_bytes else "-",
                "-" if s.allocator_peak_bytes is None else short_bytes(s.allocator_peak_bytes),
            ])
        return rows

    HEADER = ["#", "device", "blocks", "weights", "plan", "KV", "plan", "stream", "CUDA peak"]

    def table(self) -> str:
        rows = [self.HEADER] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.kv_tokens:
            lines.append(f"KV cache holds {self.kv_tokens} tokens x batch {self.batch}; plan sized for its context")
        return "\n".join(lines + self.notes)
