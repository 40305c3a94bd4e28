"""The Plan: where each block goes, what each stage holds, and what it predicts (schema 1 of DESIGN.md)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..devices.device import Device
from ..errors import BadInputError

__all__ = ["PLAN_SCHEMA", "Workload", "Stage", "Plan"]

PLAN_SCHEMA = 1
Objective = Literal["latency", "throughput"]


@dataclass(frozen=True)
class Workload:
    """context: tokens of KV cache per sequence; batch: sequences at once;
    prefill_chunk: tokens per prefill forward (the activation workspace is sized for it)."""

    context: int = 4096
    batch: int = 1
    dtype: str = "bfloat16"
    objective: Objective = "latency"
    prefill_chunk: int = 512

    @property
    def chunk_tokens(self) -> int:
        return min(self.context, self.prefill_chunk) * self.batch


@dataclass
class Stage:
    """One contiguous range of blocks on one device. ``blocks`` is half-open [start, end).
    ``mode``: "execute" runs the blocks on ``device``; "stream" keeps the weights on
    ``device`` (cpu / disk) and runs them on ``compute_device`` (a GPU), copying each
    block in just before it runs."""

    device: str
    kind: str
    blocks: tuple[int, int]
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    reserve_bytes: int
    capacity_bytes: int
    mode: str = "execute"
    compute_device: str | None = None
    torch_device: str = "cpu"
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes

    @property
    def num_blocks(self) -> int:
        return self.blocks[1] - self.blocks[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        d["total_bytes"] = self.total_bytes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["blocks"] = tuple(kw["blocks"])
        return cls(**kw)


@dataclass
class Plan:
    model: str
    workload: Workload
    fits: bool
    stages: list[Stage]
    blocks: list[dict]
    max_context: int
    predicted: dict
    device_map: dict[str, str]
    exports: dict[str, str]
    devices: list[Device] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shortfall_bytes: int = 0
    suggestions: list[str] = field(default_factory=list)
    manual_split: list[float] | None = None

    @property
    def offloaded(self) -> list[Stage]:
        return [s for s in self.stages if s.kind != "gpu"]

    def stage_of_block(self, index: int) -> Stage:
        for s in self.stages:
            if s.blocks[0] <= index < s.blocks[1]:
                return s
        raise KeyError(index)

    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "workload": asdict(self.workload),
            "fits": self.fits,
            "stages": [s.to_dict() for s in self.stages],
            "offloaded": [
                {"device": s.device, "blocks": list(s.blocks), "mode": s.mode,
                 "compute_device": s.compute_device, "weights_bytes": s.weights_bytes}
                for s in self.offloaded
            ],
            "blocks": self.blocks,
            "max_context": self.max_context,
            "predicted": self.predicted,
            "device_map": self.device_map,
            "exports": self.exports,
            "devices": [d.to_dict() for d in self.devices],
            "notes": self.notes,
            "shortfall_bytes": self.shortfall_bytes,
            "suggestions": self.suggestions,
            "manual_split": self.manual_split,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("schema") != PLAN_SCHEMA:
            raise BadInputError(f"not a VRAMancer plan (schema {PLAN_SCHEMA} expected)")
        try:
            return cls(
                model=d["model"],
                workload=Workload(**d["workload"]),
                fits=bool(d["fits"]),
                stages=[Stage.from_dict(s) for s in d["stages"]],
                blocks=list(d["blocks"]),
                max_context=int(d["max_context"]),
                predicted=dict(d["predicted"]),
                device_map=dict(d["device_map"]),
                exports=dict(d["exports"]),
                devices=[Device.from_dict(x) for x in d.get("devices", [])],
                notes=list(d.get("notes", [])),
                shortfall_bytes=int(d.get("shortfall_bytes", 0)),
                suggestions=list(d.get("suggestions", [])),
                manual_split=d.get("manual_split"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BadInputError(f"malformed plan: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise BadInputError(f"plan file is not JSON: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise BadInputError(f"cannot read plan {path}: {e.strerror}") from None
        return cls.from_json(text)

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader never sees half a plan (vramancer._io: a device node or
        FIFO is written through, never replaced; no temporary file is left on any error)."""
        from .._io import atomic_write

        atomic_write(path, self.to_json() + "\n", flag="plan file")
