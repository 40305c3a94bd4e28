"""The Plan: where each block goes, how each stage runs, what it holds and what it predicts. It is
the one hand-off from the planner to the runtime: the runtime reads the blocks' module prefixes,
each stage's mode and compute device, and the stream buffers from it, and nothing else about the
model's layout. JSON schema 2, documented in docs/plan-schema.md."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..devices.device import Device
from ..errors import BadInputError
from ._fields import FieldReader

__all__ = ["PHASE_PREFILL_TOKENS", "PLAN_SCHEMA", "Workload", "Stage", "Plan", "PlanBlock", "Prediction",
           "StreamBuffer", "ModelIdentity", "HOST_COMPUTE", "config_sha256", "ComponentPlacement", "PhasePeak",
           "ImagePrediction", "Hop", "HOP_TRANSPORTS"]

PLAN_SCHEMA = 2
Objective = Literal["latency", "throughput"]
Mode = Literal["execute", "stream", "phase"]
# a "phase" stage's forwards of at least this many tokens (batch x sequence: prefill) stream its weights
# to its GPU; smaller ones (decode) run on the host where the weights live (llama.cpp's rule for
# offloaded layers: batches of 32 tokens or more go to the GPU)
PHASE_PREFILL_TOKENS = 32
# the compute device of a disk stage in a plan that lists no host device (``--devices disk``)
HOST_COMPUTE = "cpu"
# config.json keys that do not change the model: where it was saved from, by which version, in
# which dtype (the dtype is part of the identity on its own)
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"})
_BAD = "malformed plan: "
_TORCH_DEVICE = re.compile(r"[a-z_]+(:\d+)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _normalised(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    return value


def config_sha256(config: dict) -> str:
    """SHA-256 of a model config (config.json content) normalised: keys sorted, compact separators,
    the keys that do not change the model (``_name_or_path``, ``transformers_version``, dtype) left out."""
    text = json.dumps(_normalised(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """The model a plan was made for: ``config_sha256`` of its normalised config (None when it has
    none: a plain nn.Module, a GGUF or safetensors file without a config) and its weights' dtype."""

    config_sha256: str | None
    dtype: str

    @classmethod
    def of(cls, config: dict | None, dtype: str) -> ModelIdentity:
        return cls(config_sha256(config) if isinstance(config, dict) else None, dtype)

    @property
    def short(self) -> str:
        """"config a1b2c3d4…" for messages."""
        return f"config {self.config_sha256[:8]}…" if self.config_sha256 else "no config"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """context: tokens of KV cache per sequence; batch: sequences at once;
    prefill_chunk: tokens per prefill forward (the activation workspace is sized for it);
    kv_dtype: how the KV cache is stored (--kv-dtype: q8_0, fp8, bfloat16, ...), None = the
    compute dtype."""

    context: int = 4096
    batch: int = 1
    dtype: str = "bfloat16"
    objective: Objective = "latency"
    prefill_chunk: int = 512
    kv_dtype: str | None = None

    @property
    def chunk_tokens(self) -> int:
        return min(self.context, self.prefill_chunk) * self.batch


@dataclass(frozen=True)
class PlanBlock:
    """One block of the model as the runtime loads it. ``modules``: its module name prefixes in run
    order (transformers names, e.g. ``["model.embed_tokens", "model.rotary_emb"]``); ``layer_index``:
    its index in the model's list of repeated layers (the KV cache's layer index), None for the
    blocks before and after them; ``shared_bytes``: tied weights it uses (counted on each stage).
    ``experts_device``: the host device holding (and computing) this MoE layer's routed experts,
    module ``experts_module``, ``experts_bytes`` of weights there (not in ``weights_bytes``, which is
    what ``device`` holds); None when the experts stay with the block."""

    name: str
    weights_bytes: int
    shared_bytes: int
    kv_bytes_per_token: int
    device: str
    modules: tuple[str, ...] = ()
    layer_index: int | None = None
    experts_device: str | None = None
    experts_bytes: int = 0
    experts_module: str | None = None

    @property
    def streamed_bytes(self) -> int:
        """Bytes of weights a stream slot holds for this block (its own and the tied ones it uses)."""
        return self.weights_bytes + self.shared_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules)
        if self.experts_device is None:   # only MoE layers whose experts are in host RAM carry these
            for k in ("experts_device", "experts_bytes", "experts_module"):
                del d[k]
        return d


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for the plan: speeds, and the slowest stage's index."""

    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    decode_ms_per_step: float
    bottleneck_stage: int

    def to_dict(self) -> dict:
        return asdict(self)


HOP_TRANSPORTS = ("shm", "tls", "tcp", "torch")


@dataclass(frozen=True)
class Hop:
    """One hop of a cluster plan's pipeline (absent from a one-machine plan's JSON): from ``src`` to
    ``dst`` (``"driver"`` or a stage index as ``"stage N"``), on nodes ``src_node`` / ``dst_node``, over
    ``transport`` (shm, tls, tcp, torch) chosen for ``reason``; ``bytes_per_token`` crosses it per decode step,
    in ``decode_seconds``."""

    src: str
    dst: str
    src_node: str
    dst_node: str
    transport: str
    reason: str
    bytes_per_token: int
    decode_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StreamBuffer:
    """The one double buffer on a compute device that streams weights: two slots, each the largest
    block streamed through it, shared by every stage in ``stages`` (indices of the streamed stages).
    ``device`` is a plan device id, or ``HOST_COMPUTE`` for a disk stage in a plan without a host."""

    device: str
    buffer_bytes: int
    stages: tuple[int, ...]

    @property
    def slot_bytes(self) -> int:
        return self.buffer_bytes // 2

    def to_dict(self) -> dict:
        return {"device": self.device, "buffer_bytes": self.buffer_bytes, "stages": list(self.stages)}


@dataclass(frozen=True)
class ComponentPlacement:
    """Where one component of an image pipeline lives and runs (pipeline plans only). ``mode``:
    "resident" (kept on ``device``), "split" (the denoiser, over the plan's stages), "moved" (kept in
    host RAM, copied onto ``device`` for its phase and dropped after: ``move_seconds`` per image),
    "cpu" (kept and run on the host). ``phase``: "encode" | "denoise" | "decode". ``evicts``: indices of
    the denoiser's stages on ``device`` that wait in host RAM while this moved component runs (copied
    back before the next denoising step; counted in ``move_seconds``)."""

    name: str
    role: str
    phase: str
    mode: str
    device: str
    weights_bytes: int
    activation_bytes: int
    compute_seconds: float = 0.0
    move_seconds: float = 0.0
    evicts: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["evicts"] = list(self.evicts)
        return d


@dataclass(frozen=True)
class PhasePeak:
    """Bytes ``device`` holds at the peak of ``phase`` (weights present, workspace, stream buffer)."""

    phase: str
    device: str
    bytes: int
    capacity_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImagePrediction:
    """An image pipeline plan's workload and predicted seconds: per phase and per image."""

    height: int
    width: int
    batch: int
    steps: int
    guidance: float
    encode_seconds: float
    step_seconds: float
    decode_seconds: float
    move_seconds: float
    seconds_per_image: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Stage:
    """One contiguous range of blocks on one device. ``blocks`` is half-open [start, end).
    ``mode`` is how it really runs: "execute" runs the blocks on ``device``; "stream" keeps the
    weights on ``device`` (host RAM or disk) and runs them on ``compute_device``, copying each block
    into the device's stream buffer just before it runs. The disk tier always streams (to a GPU, or
    to the host). "phase" (host RAM only) runs each forward where it is fastest: a forward of at least
    ``PHASE_PREFILL_TOKENS`` tokens (prefill) streams the weights to ``compute_device`` (a GPU) and runs
    there, a smaller one (decode) runs on ``device`` itself; its KV cache stays on ``device``.
    ``compute_device`` is ``device`` itself for an executed stage. ``activation_bytes``
    is the stage's workspace; a stream buffer is the plan's (``Plan.stream_buffers``), not a stage's."""

    device: str
    kind: str
    blocks: tuple[int, int]
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    reserve_bytes: int
    capacity_bytes: int
    mode: Mode = "execute"
    compute_device: str | None = None
    torch_device: str = "cpu"
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.compute_device is None:
            self.compute_device = self.device

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes

    @property
    def num_blocks(self) -> int:
        return self.blocks[1] - self.blocks[0]

    @property
    def streams(self) -> bool:
        return self.mode in ("stream", "phase")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        d["total_bytes"] = self.total_bytes
        return d


@dataclass
class Plan:
    model: str
    identity: ModelIdentity
    workload: Workload
    fits: bool
    stages: list[Stage]
    blocks: list[PlanBlock]
    max_context: int
    predicted: Prediction
    device_map: dict[str, str]
    exports: dict[str, str]
    devices: list[Device] = field(default_factory=list)
    stream_buffers: list[StreamBuffer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shortfall_bytes: int = 0
    suggestions: list[str] = field(default_factory=list)
    manual_split: list[float] | None = None
    # image pipelines only (absent from an LLM plan's JSON): the stages above are the denoiser's
    components: list[ComponentPlacement] = field(default_factory=list)
    phase_peaks: list[PhasePeak] = field(default_factory=list)
    image: ImagePrediction | None = None
    hops: list[Hop] = field(default_factory=list)     # cluster plans only

    @property
    def is_pipeline(self) -> bool:
        return bool(self.components)

    @property
    def offloaded(self) -> list[Stage]:
        return [s for s in self.stages if s.kind != "gpu"]

    def stage_of_block(self, index: int) -> Stage:
        for s in self.stages:
            if s.blocks[0] <= index < s.blocks[1]:
                return s
        raise KeyError(index)

    def stream_buffer(self, device: str) -> StreamBuffer | None:
        """The stream buffer on compute device ``device``, if it streams."""
        return next((b for b in self.stream_buffers if b.device == device), None)

    def weights_bytes_by_device(self) -> dict[str, int]:
        """Weight bytes each device holds under this plan: its stages' and the MoE experts kept there."""
        held: dict[str, int] = {}
        for s in self.stages:
            held[s.device] = held.get(s.device, 0) + s.weights_bytes
        for blk in self.blocks:
            if blk.experts_device is not None:
                held[blk.experts_device] = held.get(blk.experts_device, 0) + blk.experts_bytes
        return held

    def device_used_bytes(self) -> dict[str, int]:
        """Bytes each device holds under this plan: its stages' totals and its stream buffer."""
        used: dict[str, int] = {}
        for s in self.stages:
            used[s.device] = used.get(s.device, 0) + s.total_bytes
        for b in self.stream_buffers:
            used[b.device] = used.get(b.device, 0) + b.buffer_bytes
        for blk in self.blocks:
            if blk.experts_device is not None:
                used[blk.experts_device] = used.get(blk.experts_device, 0) + blk.experts_bytes
        return used

    def device_shortfalls(self) -> dict[str, int]:
        """Devices whose stages and stream buffer need more than they have: {device id: bytes over}."""
        free = {d.id: d.free_bytes for d in self.devices}
        for s in self.stages:
            free.setdefault(s.device, s.capacity_bytes)
        return {dev: used - free[dev] for dev, used in self.device_used_bytes().items()
                if dev in free and used > free[dev]}

    def experts_ranges(self) -> list[dict]:
        """The MoE routed experts kept in host RAM, as stage-like entries of kind "experts": one per
        run of consecutive blocks whose experts are on the same host device (blocks half-open, weights
        the experts' bytes there, ``stages``: the stages whose layers they belong to). Derived from
        ``blocks[*].experts_device`` (the plan JSON's "experts" list; not read back)."""
        out: list[dict] = []
        stage_of = self.block_stage_indices()
        prev = -2
        for b, blk in enumerate(self.blocks):
            if blk.experts_device is None:
                continue
            last = out[-1] if out else None
            if last is not None and prev == b - 1 and last["device"] == blk.experts_device:
                last["blocks"][1] = b + 1
                last["weights_bytes"] += blk.experts_bytes
                if stage_of[b] not in last["stages"]:
                    last["stages"].append(stage_of[b])
            else:
                out.append({"kind": "experts", "device": blk.experts_device, "blocks": [b, b + 1],
                            "compute_device": blk.experts_device, "weights_bytes": blk.experts_bytes,
                            "stages": [stage_of[b]]})
            prev = b
        return out

    def block_stage_indices(self) -> list[int]:
        """Stage index of each block."""
        out = [-1] * len(self.blocks)
        for si, s in enumerate(self.stages):
            for b in range(*s.blocks):
                out[b] = si
        return out

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "identity": self.identity.to_dict(),
            "workload": asdict(self.workload),
            "fits": self.fits,
            "stages": [s.to_dict() for s in self.stages],
            "stream_buffers": [b.to_dict() for b in self.stream_buffers],
            "offloaded": [
                {"device": s.device, "blocks": list(s.blocks), "mode": s.mode,
                 "compute_device": s.compute_device, "weights_bytes": s.weights_bytes}
                for s in self.offloaded
            ],
            **({"experts": self.experts_ranges()} if any(b.experts_device for b in self.blocks) else {}),
            "blocks": [b.to_dict() for b in self.blocks],
            "max_context": self.max_context,
            "predicted": self.predicted.to_dict(),
            "device_map": self.device_map,
            "exports": self.exports,
            "devices": [d.to_dict() for d in self.devices],
            "notes": self.notes,
            "shortfall_bytes": self.shortfall_bytes,
            "suggestions": self.suggestions,
            "manual_split": self.manual_split,
            **({"components": [c.to_dict() for c in self.components],
                "phase_peaks": [p.to_dict() for p in self.phase_peaks],
                "image": self.image.to_dict() if self.image else None} if self.components else {}),
            **({"hops": [h.to_dict() for h in self.hops]} if self.hops else {}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """The plan of a JSON document, every field checked (types, ranges, how stages, blocks,
        devices and stream buffers fit together); BadInputError with one line otherwise."""
        if not isinstance(d, dict) or "schema" not in d:
            raise BadInputError("not a VRAMancer plan (no \"schema\" field)")
        if d["schema"] != PLAN_SCHEMA:
            if d["schema"] == 1:
                raise BadInputError("this plan file has schema 1 (an older VRAMancer); re-plan it: "
                                    "vramancer plan MODEL ... -o FILE")
            raise BadInputError(f"not a VRAMancer plan of schema {PLAN_SCHEMA} (schema {d['schema']!r})")
        plan = _read_plan(FieldReader(d, _BAD))
        plan.validate()
        return plan

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """The plan of JSON text (vramancer._json: depth, UTF-8 and syntax refused in one line)."""
        from .._json import parse_json

        return cls.from_dict(parse_json(text, prefix="plan file is not JSON: "))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        from .._json import read_json_file

        return cls.from_dict(read_json_file(path, what="plan"))

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader never sees half a plan (vramancer._io: a device node or
        FIFO is written through, never replaced; no temporary file is left on any error)."""
        from .._io import atomic_write

        atomic_write(path, self.to_json() + "\n", flag="plan file")

    # -- consistency ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Check that the plan's parts agree (what a hand-edited or hand-built plan may break):
        stages contiguous in block order covering every block once (a device may hold two stages,
        as when the head comes back to a GPU), each block on its stage's device, kinds and modes
        that the tiers allow, compute devices among the plan's, exactly one stream buffer per
        compute device that streams. Raises BadInputError with one line."""
        def bad(msg: str) -> BadInputError:
            return BadInputError(_BAD + msg)

        devs = {d.id: d for d in self.devices}
        if len(devs) != len(self.devices):
            raise bad("devices: two devices have the same id")
        if not self.blocks:
            raise bad("blocks: the plan has no blocks")
        if not self.stages:
            raise bad("stages: the plan has no stages")
        end = 0
        for i, s in enumerate(self.stages):
            lo, hi = s.blocks
            if lo != end or hi <= lo:
                raise bad(f"stages[{i}].blocks: [{lo}, {hi}) should start at block {end} and hold at least one")
            end = hi
        if end != len(self.blocks):
            raise bad(f"stages cover blocks [0, {end}) but the plan has {len(self.blocks)} blocks")
        has_host = any(d.kind == "cpu" for d in self.devices)
        for i, s in enumerate(self.stages):
            where = f"stages[{i}]"
            dev = devs.get(s.device)
            if dev is None:
                raise bad(f"{where}.device: {s.device!r} is not among the plan's devices")
            if s.kind != dev.kind:
                raise bad(f"{where}.kind: {s.kind!r}, but device {s.device} is a {dev.kind}")
            if s.torch_device != dev.torch_device:
                raise bad(f"{where}.torch_device: {s.torch_device!r}, but device {s.device} is {dev.torch_device!r}")
            if s.mode not in ("execute", "stream", "phase"):
                raise bad(f"{where}.mode: {s.mode!r} is not execute, stream or phase")
            if s.mode == "phase" and s.kind != "cpu":
                raise bad(f"{where}.mode: only a host RAM (cpu) stage runs per phase")
            if s.mode == "execute":
                if s.kind == "disk":
                    raise bad(f"{where}.mode: a disk stage always streams")
                if s.compute_device != s.device:
                    raise bad(f"{where}.compute_device: an executed stage runs on its own device {s.device}")
                continue
            if s.kind == "gpu":
                raise bad(f"{where}.mode: a GPU stage executes its blocks")
            comp = devs.get(s.compute_device or "")
            ok = (comp is not None and (comp.kind == "gpu" or (s.kind == "disk" and comp.kind == "cpu"))) or \
                (s.kind == "disk" and not has_host and s.compute_device == HOST_COMPUTE)
            if not ok:
                raise bad(f"{where}.compute_device: {s.compute_device!r} cannot run a streamed {s.kind} stage "
                          "(a GPU of the plan, or the host for the disk tier)")
        stage_of = self.block_stage_indices()
        layers: set[int] = set()
        for b, blk in enumerate(self.blocks):
            if blk.device != self.stages[stage_of[b]].device:
                raise bad(f"blocks[{b}].device: {blk.device!r}, but its stage {stage_of[b]} is on "
                          f"{self.stages[stage_of[b]].device}")
            if blk.experts_device is not None:
                ed = devs.get(blk.experts_device)
                st = self.stages[stage_of[b]]
                if ed is None or ed.kind != "cpu":
                    raise bad(f"blocks[{b}].experts_device: {blk.experts_device!r} is not a host (cpu) device "
                              "of the plan")
                if st.kind != "gpu" or not blk.experts_module or blk.experts_bytes <= 0:
                    raise bad(f"blocks[{b}].experts_device: routed experts go to the host only from a block on a "
                              "GPU, with experts_module and experts_bytes > 0")
            if blk.layer_index is not None:
                if blk.layer_index in layers:
                    raise bad(f"blocks[{b}].layer_index: {blk.layer_index} is another block's")
                layers.add(blk.layer_index)
        streaming: dict[str, list[int]] = {}
        for i, s in enumerate(self.stages):
            if s.mode in ("stream", "phase"):
                streaming.setdefault(s.compute_device or "", []).append(i)
        seen: set[str] = set()
        for j, buf in enumerate(self.stream_buffers):
            if buf.device in seen:
                raise bad(f"stream_buffers[{j}]: a second buffer on {buf.device} (one per device)")
            seen.add(buf.device)
            if not buf.stages or list(buf.stages) != streaming.get(buf.device, []):
                raise bad(f"stream_buffers[{j}].stages: {list(buf.stages)}, but the stages streamed to "
                          f"{buf.device} are {streaming.get(buf.device, [])}")
            # two slots, each at least the largest block streamed through it; no more than its device has
            need = 2 * max(self.blocks[b].streamed_bytes for i in buf.stages for b in range(*self.stages[i].blocks))
            room = devs[buf.device].free_bytes if buf.device in devs else None
            if buf.buffer_bytes < need or (room is not None and buf.buffer_bytes > room):
                raise bad(f"stream_buffers[{j}].buffer_bytes: {buf.buffer_bytes}, but two slots of the largest "
                          f"block streamed through it take {need}" + (f" and {buf.device} has {room}" if room else ""))
        missing = [d for d in streaming if d not in seen]
        if missing:
            raise bad(f"stream_buffers: none on {missing[0]}, which stages stream to")
        if not 0 <= self.predicted.bottleneck_stage < len(self.stages):
            raise bad(f"predicted.bottleneck_stage: {self.predicted.bottleneck_stage} is not a stage")
        for j, c in enumerate(self.components):
            for i in c.evicts:
                if c.mode != "moved" or not 0 <= i < len(self.stages) or self.stages[i].device != c.device \
                        or self.stages[i].mode != "execute":
                    raise bad(f"components[{j}].evicts: stage {i} is not an executed stage on {c.device} "
                              "that a moved component can send to host RAM")
        if self.identity.dtype != self.workload.dtype:
            raise bad(f"identity.dtype: {self.identity.dtype!r}, but the workload's is {self.workload.dtype!r}")


# ------------------------------------------------------------------------------------------------
def _read_workload(r: FieldReader) -> Workload:
    from ..models.dtypes import resolve_dtype

    dtype = r.str("dtype", nonempty=True)
    try:
        resolve_dtype(dtype)
    except BadInputError:
        raise r.error(f"unknown dtype {dtype!r}", "dtype") from None
    return Workload(context=r.int("context", lo=1, hi=1 << 31), batch=r.int("batch", lo=1, hi=1 << 20),
                    dtype=dtype, objective=r.str("objective", ("latency", "throughput")),
                    prefill_chunk=r.int("prefill_chunk", lo=1, hi=1 << 31), kv_dtype=_read_kv_dtype(r))


def _read_kv_dtype(r: FieldReader) -> str | None:
    from ..models.dtypes import resolve_kv_dtype

    kv = r.raw("kv_dtype", None)
    if kv is None:
        return None
    try:
        return resolve_kv_dtype(kv if isinstance(kv, str) else repr(kv)).name
    except BadInputError:
        raise r.error(f"unknown KV-cache dtype {kv!r}", "kv_dtype") from None


def _read_device(r: FieldReader) -> Device:
    kw: dict[str, Any] = dict(
        id=r.str("id", nonempty=True), name=r.str("name"), kind=r.str("kind", ("gpu", "cpu", "disk")),
        total_bytes=r.int("total_bytes"), free_bytes=r.int("free_bytes"),
        bandwidth_bytes_per_s=r.float("bandwidth_bytes_per_s", lo=1.0),
        tflops=r.float("tflops"), simulated=r.bool("simulated", False),
        backing=r.str("backing", default=None, nullable=True), torch_device=r.str("torch_device"),
        uuid=r.str("uuid", default=None, nullable=True), pci_bus_id=r.str("pci_bus_id", default=None, nullable=True),
        link_bandwidth_bytes_per_s=r.float("link_bandwidth_bytes_per_s", lo=1.0, default=25e9),
        vendor=r.str("vendor", default=None, nullable=True),
        catalog_key=r.str("catalog_key", default=None, nullable=True),
        unified_memory=r.bool("unified_memory", False), p2p_peers=tuple(r.strs("p2p_peers", [])))
    if not _TORCH_DEVICE.fullmatch(kw["torch_device"]):
        raise r.error(f"{kw['torch_device']!r} is not a torch device", "torch_device")
    return Device(**kw)


def _read_stage(r: FieldReader, n_blocks: int) -> Stage:
    blocks = r.list("blocks")
    if len(blocks) != 2:
        raise r.error("expected [start, end)", "blocks")
    lo = r.check_int(blocks[0], "blocks", 0, n_blocks)
    hi = r.check_int(blocks[1], "blocks", 0, n_blocks)
    return Stage(device=r.str("device", nonempty=True), kind=r.str("kind", ("gpu", "cpu", "disk")),
                 blocks=(lo, hi), weights_bytes=r.int("weights_bytes"), kv_cache_bytes=r.int("kv_cache_bytes"),
                 activation_bytes=r.int("activation_bytes"), reserve_bytes=r.int("reserve_bytes"),
                 capacity_bytes=r.int("capacity_bytes"), mode=r.str("mode", ("execute", "stream", "phase")),
                 compute_device=r.str("compute_device", nonempty=True), torch_device=r.str("torch_device"),
                 decode_seconds=r.float("decode_seconds", default=0.0),
                 prefill_seconds=r.float("prefill_seconds", default=0.0))


def _read_block(r: FieldReader) -> PlanBlock:
    return PlanBlock(name=r.str("name"), weights_bytes=r.int("weights_bytes"), shared_bytes=r.int("shared_bytes"),
                     kv_bytes_per_token=r.int("kv_bytes_per_token"), device=r.str("device", nonempty=True),
                     modules=tuple(r.strs("modules")), layer_index=r.optional_int("layer_index", hi=1 << 31),
                     experts_device=r.str("experts_device", default=None, nullable=True),
                     experts_bytes=r.int("experts_bytes", default=0),
                     experts_module=r.str("experts_module", default=None, nullable=True))


def _read_plan(r: FieldReader) -> Plan:
    blocks = [_read_block(b) for b in r.objs("blocks")]
    ident = r.obj("identity")
    digest = ident.str("config_sha256", nullable=True)
    if digest is not None and not _SHA256.fullmatch(digest):
        raise ident.error("expected 64 lowercase hex digits", "config_sha256")
    pred = r.obj("predicted")
    split = r.raw("manual_split", None)
    if split is not None:
        split = [r.check_float(x, "manual_split") for x in r.list("manual_split")]
    return Plan(
        model=r.str("model"),
        identity=ModelIdentity(digest, ident.str("dtype", nonempty=True)),
        workload=_read_workload(r.obj("workload")),
        fits=r.bool("fits"),
        stages=[_read_stage(s, len(blocks)) for s in r.objs("stages")],
        blocks=blocks,
        max_context=r.int("max_context", hi=1 << 40),
        predicted=Prediction(decode_tokens_per_s=pred.float("decode_tokens_per_s"),
                             prefill_tokens_per_s=pred.float("prefill_tokens_per_s"),
                             decode_ms_per_step=pred.float("decode_ms_per_step"),
                             bottleneck_stage=pred.int("bottleneck_stage", hi=1 << 20)),
        device_map=r.str_map("device_map"),
        exports=r.str_map("exports", {}),
        devices=[_read_device(x) for x in r.objs("devices")],
        stream_buffers=[StreamBuffer(b.str("device", nonempty=True), b.int("buffer_bytes"),
                                     tuple(b.check_int(x, "stages", 0, 1 << 20) for x in b.list("stages")))
                        for b in r.objs("stream_buffers")],
        notes=r.strs("notes", []),
        shortfall_bytes=r.int("shortfall_bytes", default=0),
        suggestions=r.strs("suggestions", []),
        manual_split=split,
        components=[ComponentPlacement(
            name=c.str("name", nonempty=True), role=c.str("role", ("text_encoder", "denoiser", "vae", "other")),
            phase=c.str("phase", ("encode", "denoise", "decode")),
            mode=c.str("mode", ("resident", "split", "moved", "cpu")),
            device=c.str("device", nonempty=True), weights_bytes=c.int("weights_bytes"),
            activation_bytes=c.int("activation_bytes"), compute_seconds=c.float("compute_seconds", default=0.0),
            move_seconds=c.float("move_seconds", default=0.0),
            evicts=tuple(c.check_int(x, "evicts", 0, 1 << 20) for x in c.list("evicts", [])))
            for c in r.objs("components", [])],
        phase_peaks=[PhasePeak(p.str("phase", ("encode", "denoise", "decode")), p.str("device", nonempty=True),
                               p.int("bytes"), p.int("capacity_bytes")) for p in r.objs("phase_peaks", [])],
        image=_read_image(r),
        hops=[Hop(h.str("src", nonempty=True), h.str("dst", nonempty=True), h.str("src_node"), h.str("dst_node"),
                  h.str("transport", HOP_TRANSPORTS), h.str("reason"), h.int("bytes_per_token"),
                  h.float("decode_seconds")) for h in r.objs("hops", [])],
    )


def _read_image(r: FieldReader) -> ImagePrediction | None:
    if r.raw("image", None) is None:
        return None
    i = r.obj("image")
    return ImagePrediction(
        height=i.int("height", lo=1, hi=1 << 16), width=i.int("width", lo=1, hi=1 << 16),
        batch=i.int("batch", lo=1, hi=1 << 12), steps=i.int("steps", lo=1, hi=1 << 14), guidance=i.float("guidance"),
        encode_seconds=i.float("encode_seconds"), step_seconds=i.float("step_seconds"),
        decode_seconds=i.float("decode_seconds"), move_seconds=i.float("move_seconds"),
        seconds_per_image=i.float("seconds_per_image"))
