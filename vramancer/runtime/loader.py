"""Load a model split over devices: build it on ``meta``, then read each tensor of the safetensors
checkpoint straight onto the device of the stage that owns it, and attach the split runtime.

The plan is the only thing read about the split: which modules each block is (``plan.blocks``),
which stage runs where and how (``Stage.mode`` / ``compute_device``), and the stream buffer of each
compute device that streams (``plan.stream_buffers``). A plan is refused (one line) when it was
made for another model (``plan.identity``: the config's hash) or names modules the model lacks.

    model = vramancer.runtime.loader.load("./my-model", devices="rtx3090,rtx3060")
    model.generate(...)            # transformers interface
    model.vramancer                # the SplitRuntime: .plan, .stages, .memory_report(), .detach()

Where each tensor goes, by its stage in the plan:
  * "execute" stage: its torch device (a GPU, or the CPU for the cpu tier and simulated devices);
  * "stream" stage on the cpu tier: host RAM (pinned when the compute device is CUDA), copied to the
    compute device just before use (see stream.py);
  * "stream" stage on the disk tier (the disk tier always streams, to a GPU or to the host): nothing
    is loaded; the tensor streams from the checkpoint file (or, when it must be converted first,
    from an offload file written here one tensor at a time).

Host memory during a load stays at what the loaded model keeps in host RAM plus one staging buffer
of the largest tensor: tensors are read with ``pread`` into their destination (see checkpoint.py).
Checkpoint names are mapped to the model's with transformers' own conversion mapping (renames such
as ``block_sparse_moe`` -> ``mlp``, and merges such as per-expert weights -> fused expert tensors).
Tied weights (embeddings and LM head) are one tensor on a stage that holds both, one copy on each
stage otherwise.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    BadInputError,
    CheckpointMismatchError,
    DeviceOutOfMemoryError,
    UnknownModelError,
    VramancerError,
    WorkloadError,
)
from ..models.dtypes import resolve_dtype
from ..units import format_bytes
from .memory import tensor_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..plan.plan import Plan
    from .checkpoint import Checkpoint
    from .layout import StageLayout
    from .progress import LoadProgress
    from .split import SplitRuntime

__all__ = ["load", "load_module", "load_folder", "build_empty_model", "model_class", "torch_dtype",
           "weights_folder", "check_identity", "check_torch_devices", "load_gguf"]

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_log = logging.getLogger("vramancer.loader")
_LIST_MAX = 12


def torch_dtype(name: str) -> torch.dtype:
    """"bfloat16" / "bf16" -> torch.bfloat16; quantized names are refused (the runtime runs float weights)."""
    import torch

    d = resolve_dtype(name)
    if d.quantized or d.name not in _FLOAT_DTYPES:
        raise WorkloadError(f"the runtime loads float weights (float32, float16, bfloat16), not {d.name}")
    return getattr(torch, d.name)


def weights_folder(model: Any) -> Path:
    """The local folder with config.json and safetensors for ``model`` (a folder, or a name the
    profile resolver finds on disk, such as an HF id in the local cache)."""
    from ..models.checkpoint import refuse_pickle_only

    p = Path(str(model)).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UnknownModelError(f"{p}: no config.json (a transformers model folder is needed)")
        refuse_pickle_only(p, str(model))
        from .._json import check_json_files

        check_json_files(p)   # tokenizer / generation configs: one line here, not a traceback in transformers
        return p
    if p.is_file():
        if p.suffix == ".safetensors" and (p.parent / "config.json").is_file():
            return p.parent
        raise UnknownModelError(f"{p}: the runtime loads a transformers folder (config.json + safetensors)")
    from ..models.resolve import profile as make_profile

    prof = make_profile(model)
    if not prof.path:
        raise UnknownModelError(f"{model}: no local weights (catalog models can be planned, not run); "
                                "pass a folder with config.json and safetensors")
    if Path(prof.path).is_dir():  # an HF id: the convert command names the id, not the snapshot folder
        refuse_pickle_only(prof.path, str(model))
    return weights_folder(prof.path)


def model_class(config: Any) -> type:
    """The transformers class named in ``config.architectures``, else the causal-LM / base auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise UnknownModelError(f"transformers has no model class for {getattr(config, 'model_type', '?')}")


def build_empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with parameters on ``meta`` (no memory) and buffers computed on the
    CPU, tied weights tied, in eval mode."""
    from accelerate import init_empty_weights

    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model


def check_identity(plan: Plan, config: dict | None, model_name: str) -> None:
    """Refuse (BadInputError, one line) a plan made for another model: the hash of the model's
    config must be the plan's. Plans of models without a config (plain nn.Modules) are checked by
    their module names instead (``layout_from_plan``)."""
    from ..plan.plan import ModelIdentity

    if plan.identity.config_sha256 is None:
        return
    mine = ModelIdentity.of(config, plan.workload.dtype)
    if mine.config_sha256 != plan.identity.config_sha256:
        raise BadInputError(f"plan made for {plan.model} ({plan.identity.short}), this is {model_name} "
                            f"({mine.short}); plan again for this model")


# ------------------------------------------------------------------------------------------------
# where each tensor comes from
@dataclass(frozen=True)
class _Quant:
    """A float checkpoint quantized on load: the backend, the compute dtype the float weights are
    cast to before quantizing, and the weight names its layers hold."""

    backend: Any
    compute: Any
    names: frozenset[str]
    # a pre-quantized checkpoint (runtime/quant/prequantized.py): weight name -> builder(checkpoint, device)
    built: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)


@dataclass
class _Source:
    """``key`` in the checkpoint, or ``tensor`` (an nn.Module's own, or the output of a conversion),
    or ``convert``: a callable producing {target name: tensor} (run when needed)."""

    key: str | None = None
    tensor: Any = None
    convert: Callable[[], dict] | None = None


def _ignored(name: str, patterns: Any) -> bool:
    return any(re.search(p, name) for p in (patterns or ()))


def _ignore_patterns(model: nn.Module) -> tuple[list[str], list[str]]:
    """(unexpected, missing) patterns exactly as ``from_pretrained`` applies them: the class's
    ``_keys_to_ignore_on_load_*`` plus its generic rules for legacy persistent buffers
    (``rotary_emb.inv_freq`` and ``position_ids`` when the model now has such buffers)."""
    unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        unexpected.append(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        unexpected.append(r"(^|\.)position_ids$")
    return unexpected, missing


def _listing(names: list[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _LIST_MAX} more)" if len(names) > _LIST_MAX else ""
    return ", ".join(names[:_LIST_MAX]) + more


def _checkpoint_sources(model: nn.Module, ckpt: Checkpoint, given: dict[str, _Source] | None = None,
                        hidden: frozenset[str] = frozenset()) -> dict[str, _Source]:
    """Model state name -> source, with transformers' conversion mapping; raises
    CheckpointMismatchError listing missing, unexpected and mis-shaped tensors. ``given``: sources
    decided already (pre-quantized weights), ``hidden``: checkpoint keys they read."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    meta_sd = model.state_dict()
    ignore_unexpected, ignore_missing = _ignore_patterns(model)
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    direct: dict[str, str] = {}
    pending: dict[str, Any] = {}
    unexpected: list[str] = []
    stored = ckpt.keys()
    for key in sorted((k for k in stored if k not in hidden), key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = key, None
        if renamed not in meta_sd:
            if not _ignored(key, ignore_unexpected):
                unexpected.append(key)
            continue
        if pattern is None:
            direct.setdefault(renamed, key)
        else:
            conv = pending.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
            conv.add_tensor(renamed, key, pattern, lambda k=key: ckpt.read(k))
    sources: dict[str, _Source] = {}
    mismatched: list[str] = []
    for name, key in direct.items():
        info = ckpt.info(key)
        if tuple(info.shape) != tuple(meta_sd[name].shape):
            mismatched.append(f"{name} {list(info.shape)} vs {list(meta_sd[name].shape)}")
        sources[name] = _Source(key=key)
    for first, conv in pending.items():
        def run(first=first, conv=conv) -> dict:
            out = copy.deepcopy(conv).convert(first, model=model, config=model.config)
            return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}
        produced = [first] + [first.replace(conv.target_patterns[0], t) for t in conv.target_patterns[1:]]
        for name in produced:
            sources.setdefault(name, _Source(convert=run))
    sources.update(given or {})
    # tied names share one source
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():
        have = next((sources[n] for n in names if n in sources), None)
        if have is not None:
            for n in names:
                sources.setdefault(n, have)
    missing = [n for n in meta_sd if n not in sources and not _ignored(n, ignore_missing)]
    if unexpected and not missing and not mismatched:
        # what from_pretrained loads with a warning (extra tensors, every model tensor present):
        # loaded the same way, the extras left unread
        _log.warning("checkpoint %s: %d tensors %s does not use, left unread: %s", ckpt.path, len(unexpected),
                     type(model).__name__, _listing(unexpected))
        unexpected = []
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
        if mismatched:
            parts.append(f"wrong shape {len(mismatched)}: {_listing(mismatched)}")
        raise CheckpointMismatchError(f"checkpoint {ckpt.path} does not match {type(model).__name__}: "
                                      + "; ".join(parts), missing=missing, unexpected=unexpected)
    return sources


# ------------------------------------------------------------------------------------------------
class _Placer:
    """Puts every tensor of ``model`` where its stage wants it, and builds the SplitRuntime."""

    def __init__(self, model: nn.Module, plan: Plan, layout: StageLayout, sources: dict[str, _Source],
                 ckpt: Checkpoint | None, offload_dir: str | None, progress: LoadProgress | None = None,
                 quant: _Quant | None = None):
        import torch

        self.model = model
        self.quant = quant
        self.progress = progress
        self.plan = plan
        self.layout = layout
        self.sources = sources
        self.ckpt = ckpt
        self.offload_dir = offload_dir
        self.made_offload_dir = False
        self.offload_files: list[str] = []     # written into a caller's offload_dir
        self.checkpoints: list[Checkpoint] = [ckpt] if ckpt is not None else []
        self.device: list[torch.device] = []
        self.compute: list[torch.device] = []
        self.tier: list[str] = []          # "device" | "host" | "disk"
        for st in plan.stages:             # how each stage runs is the plan's (validated) word
            compute = _torch_device(compute_torch_device(plan, st.compute_device))
            if st.mode in ("stream", "phase"):     # phase: streamed for prefill, run at home for decode
                tier = "disk" if st.kind == "disk" else "host"
                home = torch.device("cpu")
            else:
                home = compute
                tier = "device"
            self.device.append(home)
            self.compute.append(compute)
            self.tier.append(tier)
        self.stage_now = 0
        self.staging: torch.Tensor | None = None
        self.placed: dict[str, Any] = {}                      # name -> tensor on its stage (or home)
        self.disk: dict[str, tuple[Any, str]] = {}           # name -> (checkpoint, key) for disk tier
        self.converted: dict[int, dict] = {}                 # id(convert fn) -> its outputs, while needed

    # -- reading ----------------------------------------------------------------------------
    def _staging(self, nbytes: int, pinned: bool) -> torch.Tensor:
        import torch

        if self.staging is None or self.staging.numel() < nbytes or (pinned and not self.staging.is_pinned()):
            self.staging = None
            size = max(nbytes, self.ckpt.largest_tensor_bytes if self.ckpt else nbytes)
            self.staging = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        return self.staging

    def _produce(self, name: str, src: _Source) -> torch.Tensor:
        """The tensor for ``name`` as a CPU (or source-device) tensor, for conversions and copies."""
        if src.tensor is not None:
            return src.tensor
        if src.convert is not None:
            out = self.converted.get(id(src.convert))
            if out is None:
                out = src.convert()
                self.converted[id(src.convert)] = out
            if name not in out:
                raise CheckpointMismatchError(f"conversion did not produce {name}", missing=[name])
            return out[name]
        return self.ckpt.read(src.key)

    def _materialize(self, name: str, src: _Source, meta: torch.Tensor, device: torch.device,
                     pinned: bool) -> torch.Tensor:
        import torch

        dtype = meta.dtype if meta.is_floating_point() else None
        if src.key is not None:
            info = self.ckpt.info(src.key)
            from .checkpoint import torch_dtype_of

            stored = torch_dtype_of(info.dtype)
            want = dtype or stored
            if device.type == "cpu" and stored == want:
                out = torch.empty(info.shape, dtype=want, pin_memory=pinned)
                self.ckpt.read_into(src.key, out)
                return out
            view = self.ckpt.read_into(src.key, self._staging(info.nbytes, device.type == "cuda"))
            out = torch.empty(info.shape, dtype=want, device=device, pin_memory=pinned and device.type == "cpu")
            out.copy_(view)
            return out
        t = self._produce(name, src)
        if tuple(t.shape) != tuple(meta.shape):
            raise CheckpointMismatchError(f"{name}: shape {list(t.shape)} where the model has {list(meta.shape)}",
                                          missing=[name])
        want = dtype or t.dtype
        if t.device == device and t.dtype == want and not pinned:
            return t
        if pinned:
            out = torch.empty(t.shape, dtype=want, pin_memory=True)
            out.copy_(t)
            return out
        return t.to(device=device, dtype=want)

    # -- placing ----------------------------------------------------------------------------
    def place_all(self) -> None:
        import torch

        meta = self.model.state_dict(keep_vars=True)
        groups: dict[int, list[str]] = {}
        for name, t in meta.items():
            groups.setdefault(id(t), []).append(name)
        order = sorted(groups.values(), key=lambda names: min(self.layout.stage_of(n) for n in names))
        disk_specs: list[tuple[str, Any, tuple[int, ...], Callable[[], Any]]] = []
        with torch.no_grad():
            for names in order:
                first = names[0]
                src = self.sources.get(first)
                if src is None:
                    continue  # ignored missing key: keeps what the module was built with
                by_stage: dict[int, list[str]] = {}
                for n in names:
                    by_stage.setdefault(self.layout.stage_of(n), []).append(n)
                made: torch.Tensor | None = None
                is_param = _is_param(self.model, first)
                for si in sorted(by_stage):
                    self.stage_now = si
                    tier = self.tier[si]
                    if tier == "disk" and is_param:
                        key_ok = (src.key is not None and self.ckpt is not None
                                  and _stored_dtype(self.ckpt, src.key) == meta[first].dtype)
                        for n in by_stage[si]:
                            if key_ok:
                                self.disk[n] = (self.ckpt, src.key)
                            else:
                                disk_specs.append((n, meta[first].dtype, tuple(meta[first].shape),
                                                   lambda n=n, s=src, m=meta[first]: self._to_cpu(n, s, m)))
                        self._count(si, meta[first].numel() * meta[first].element_size())
                        continue
                    # streamed stages keep their parameters at home; buffers live where they run
                    device = self.compute[si] if (tier == "disk" or not is_param) else self.device[si]
                    pinned = tier == "host" and is_param and self.compute[si].type == "cuda"
                    host = self.layout.host_of(first)
                    if host is not None:   # MoE routed experts the plan keeps (and runs) in host RAM
                        device, pinned = _torch_device(compute_torch_device(self.plan, host)), False
                    if made is None and self.quant is not None and first in self.quant.built:
                        t = self.quant.built[first](self.ckpt, device)   # a pre-quantized weight, as stored
                    elif made is None and self.quant is not None and first in self.quant.names:
                        # float on its stage's device, quantized there before the next tensor is read
                        want = torch.empty(meta[first].shape, dtype=self.quant.compute, device="meta")
                        t = self.quant.backend.quantize(self._materialize(first, src, want, device, False), device)
                    elif made is None:
                        t = self._materialize(first, src, meta[first], device, pinned)
                    else:  # the same weight on another stage: its own copy there
                        t = torch.empty_like(made, device=device, pin_memory=pinned and device.type == "cpu")
                        t.copy_(made)
                    made = t
                    for n in by_stage[si]:
                        self.placed[n] = t
                    self._assign(by_stage[si], t)
                    self._count(si, tensor_bytes(t))
                self._drop_converted(src)
            # buffers nobody loads (non-persistent: rotary frequencies, ...) are computed, not loaded
            for name, buf in list(self.model.named_buffers(remove_duplicate=False)):
                if name in self.placed:
                    continue
                si = self.layout.stage_of(name)
                self.stage_now = si
                dev = self.compute[si]
                if buf.device != dev:
                    self._assign([name], buf.to(dev))
            if disk_specs:
                self._write_offload(disk_specs)
        self.staging = None
        empty = [n for n, p in self.model.named_parameters(remove_duplicate=False)
                 if p.device.type == "meta" and n not in self.disk]
        if empty:
            raise CheckpointMismatchError(f"no weights for {len(empty)} parameters: {_listing(empty)}",
                                          missing=empty)

    def _count(self, stage: int, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.placed(stage, nbytes)

    def _to_cpu(self, name: str, src: _Source, meta: torch.Tensor) -> torch.Tensor:
        """One tensor for the offload file; a conversion's outputs are not kept past it."""
        import torch

        t = self._materialize(name, src, meta, torch.device("cpu"), False)
        self.converted.clear()
        return t

    def _drop_converted(self, src: _Source) -> None:
        if src.convert is not None:
            out = self.converted.get(id(src.convert))
            if out is not None and all(n in self.placed or n in self.disk for n in out):
                del self.converted[id(src.convert)]

    def release_offload(self) -> None:
        """Remove the offload files of a load that failed (the folder too when made here)."""
        from .scratch import release

        if self.made_offload_dir:
            release(self.offload_dir)
        for path in self.offload_files:
            release(path)
        self.offload_files = []

    def _write_offload(self, specs: list[tuple[str, Any, tuple[int, ...], Callable[[], Any]]]) -> None:
        from .checkpoint import write_safetensors

        if self.offload_dir is None:  # under the cache folder: /tmp may be RAM (tmpfs), defeating the disk tier
            from .._paths import cache_dir
            from .scratch import make_offload_dir

            # removed at detach, on a failed load, at exit, on SIGTERM; a killed run's at the next start
            self.offload_dir = make_offload_dir(cache_dir() / "offload")
            self.made_offload_dir = True
        os.makedirs(self.offload_dir, exist_ok=True)
        path = os.path.join(self.offload_dir, f"offload-{os.getpid()}-{id(self):x}.safetensors")
        if not self.made_offload_dir:   # a folder the caller gave: our file in it goes as ours do
            from .scratch import track

            self.offload_files.append(track(path))
        try:
            ck = write_safetensors(path, [(n, d, s) for n, d, s, _ in specs], (f() for _, _, _, f in specs))
        except OSError as e:   # a full or read-only disk: one line (the caller removes what was written)
            raise VramancerError(f"cannot write the disk tier's offload file {path}: {e.strerror or e}") from None
        self.checkpoints.append(ck)
        for n, _, _, _ in specs:
            self.disk[n] = (ck, n)

    def _assign(self, names: list[str], t: torch.Tensor) -> None:
        """Point every name in ``names`` at ``t`` (one Parameter object: ties stay ties)."""
        from torch import nn

        param: Any = None
        for n in names:
            owner, attr = _owner(self.model, n)
            if attr in owner._parameters:
                if param is None:
                    param = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
                setattr(owner, attr, param)
            else:
                setattr(owner, attr, t)

    # -- runtime ------------------------------------------------------------------------------
    def build_runtime(self) -> SplitRuntime:
        import torch
        from torch import nn

        from .split import RuntimeStage, SplitRuntime
        from .stream import StreamEngine, StreamParam, StreamUnit

        stages: list[RuntimeStage] = []
        blocks = self.layout.blocks
        config = getattr(self.model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        homes: dict[str, nn.Parameter] = {}
        for si, st in enumerate(self.plan.stages):
            units: list[tuple[str, nn.Module]] = []
            layers: list[tuple[int, nn.Module]] = []
            for b, prefix in self.layout.block_modules(si):
                mod = self.model.get_submodule(prefix)     # layout_from_plan checked every prefix
                units.append((prefix, mod))
                li = blocks.layer_index(b)
                if li is not None:
                    layers.append((li, mod))
            rs = RuntimeStage(si, st, st.mode, self.device[si], self.compute[si], units, layers, config=text_config)
            rs.host_experts = self._host_experts(si)
            if self.tier[si] != "device":
                with torch.no_grad():
                    for prefix, mod in units:
                        unit = StreamUnit(prefix, mod, si)
                        for name, p in mod.named_parameters(prefix=prefix, remove_duplicate=False):
                            owner, attr = _owner(self.model, name)
                            if name in self.disk:
                                ck, key = self.disk[name]
                                home_t, ident = None, f"{ck.path}:{key}"
                            else:
                                home_t = self.placed[name]
                                ident = f"host:{id(home_t)}"
                            hp = homes.get(ident)
                            if hp is None:
                                hp = (nn.Parameter(home_t, requires_grad=False) if home_t is not None else
                                      nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                   requires_grad=False))
                                homes[ident] = hp
                            setattr(owner, attr, hp)
                            sp = StreamParam(owner, attr, tuple(p.shape), p.dtype, p.numel() * p.element_size(),
                                             home=home_t, home_param=hp, key=ident)
                            if home_t is None:
                                sp.source, sp.file_key = self.disk[name]
                            unit.params.append(sp)
                        if unit.params:
                            rs.stream_units.append(unit)
            stages.append(rs)
        engines = []
        for buf in self.plan.stream_buffers:     # one engine per stream buffer, the size the plan gives it
            served = [rs for rs in stages if rs.index in buf.stages]
            units = [u for rs in served for u in rs.stream_units]
            if units:
                engines.append(StreamEngine(units, served[0].compute_device, slot_bytes=buf.slot_bytes,
                                            plan_device=buf.device))
        notes = []
        unowned_params = [n for n in self.layout.unowned if _is_param(self.model, n)]
        if unowned_params:
            notes.append(f"parameters no block lists went to stage 0: {_listing(unowned_params)}")
        runtime = SplitRuntime(self.model, self.plan, self.layout, stages, engines=engines,
                               checkpoints=self.checkpoints, offload_dir=self.offload_dir, notes=notes,
                               cleanup_offload_dir=self.made_offload_dir)
        runtime.offload_files = list(self.offload_files)
        return runtime

    def _host_experts(self, si: int) -> list:
        """The MoE experts modules of stage ``si``'s blocks that the plan keeps in host RAM."""
        from .experts import HostExperts

        out = []
        for b, (name, host) in sorted(self.layout.blocks.host_experts.items()):
            if self.layout.stage_of_block[b] == si:
                out.append(HostExperts(b, name, self.model.get_submodule(name),
                                       _torch_device(compute_torch_device(self.plan, host)), self.compute[si],
                                       host, self.plan.blocks[b].experts_bytes))
        return out

    def oom_error(self, err: BaseException) -> DeviceOutOfMemoryError:
        st = self.plan.stages[self.stage_now]
        dev = st.compute_device or st.device
        return DeviceOutOfMemoryError(
            f"out of memory on {dev} while loading stage {self.stage_now} (blocks {st.blocks[0]}-"
            f"{st.blocks[1] - 1}, planned {format_bytes(st.total_bytes)}): free memory on {dev}, or plan "
            f"with a larger --reserve, a shorter --context, or more --devices (e.g. add cpu)",
            device=dev, stage=self.stage_now)


def compute_torch_device(plan: Plan, device_id: str | None) -> str:
    """The torch device behind plan device ``device_id`` (``HOST_COMPUTE``, the host, is "cpu")."""
    dev = next((d for d in plan.devices if d.id == device_id), None)
    return dev.torch_device if dev is not None else "cpu"


def check_torch_devices(plan: Plan) -> None:
    """Refuse (one line) a plan whose stages live or run on torch devices this machine lacks (a plan
    made on another machine, or edited): before anything is built or read."""
    import torch

    for i, st in enumerate(plan.stages):
        for name in dict.fromkeys((st.torch_device, compute_torch_device(plan, st.compute_device))):
            try:
                d = torch.device(name)
            except RuntimeError:
                raise BadInputError(f"plan stage {i}: {name!r} is not a torch device") from None
            there = (d.type == "cpu"
                     or (d.type == "cuda" and torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count())
                     or (d.type == "mps" and torch.backends.mps.is_available()))
            if not there:
                raise BadInputError(f"the plan puts stage {i} on {name}, which this machine does not have; "
                                    "plan again here (or --backing to run simulated devices elsewhere)")


def _torch_device(name: str) -> torch.device:
    import torch

    d = torch.device(name)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _is_param(model: nn.Module, name: str) -> bool:
    owner, attr = _owner(model, name)
    return attr in owner._parameters


def _stored_dtype(ckpt: Checkpoint, key: str) -> torch.dtype:
    from .checkpoint import torch_dtype_of

    return torch_dtype_of(ckpt.info(key).dtype)


def _place(model: nn.Module, plan: Plan, sources: dict[str, _Source],
           ckpt: Checkpoint | None, offload_dir: str | None, free_on_error: bool,
           progress: LoadProgress | None = None, quant: _Quant | None = None) -> nn.Module:
    import torch

    from .layout import layout_from_plan, stage_layout

    check_torch_devices(plan)
    layout = stage_layout(model, layout_from_plan(plan, model), plan)
    placer = _Placer(model, plan, layout, sources, ckpt, offload_dir, progress, quant)
    try:
        placer.place_all()
        runtime = placer.build_runtime()
    except (torch.OutOfMemoryError, MemoryError) as e:
        err = placer.oom_error(e)
        for ck in placer.checkpoints:
            ck.close()
        placer.release_offload()
        placer.placed.clear()
        placer.converted.clear()
        if free_on_error:
            from .split import free_module

            free_module(model)
        raise err from None
    except BaseException:
        for ck in placer.checkpoints:
            ck.close()
        placer.release_offload()
        raise
    runtime.attach()
    model.vramancer = runtime
    return model


# ------------------------------------------------------------------------------------------------
def load_folder(folder: str | os.PathLike, plan: Plan, dtype: str | None = None,
                offload_dir: str | None = None, model_ref: Any = None,
                progress: LoadProgress | None = None, quant_backend: str | None = None) -> nn.Module:
    """Build the model of ``folder`` on meta and load its checkpoint per ``plan``. ``quant_backend``:
    the package quantizing a float checkpoint on load ("bitsandbytes", "torchao"; runtime/quant/)."""
    from transformers import AutoConfig

    from ..models.checkpoint import read_config
    from .checkpoint import Checkpoint

    folder = Path(folder)
    plan.validate()
    check_identity(plan, read_config(folder / "config.json"), str(model_ref if model_ref is not None else folder))
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UnknownModelError(f"{folder}: unreadable config.json ({e})") from None
    dt_name = dtype or plan.workload.dtype
    quant = None
    prequant = _prequantized(folder, plan)
    if prequant is not None:   # bitsandbytes weights as stored (runtime/quant/prequantized.py)
        if quant_backend not in (None, prequant.method):
            _no_quant_backend(quant_backend, f"their stored {prequant.method} blocks")
        model = build_empty_model(config, prequant.float_dtype)
        prequant.swap_layers(model)
        quant = _Quant(None, prequant.float_dtype, frozenset(), built=prequant.weights)
    elif resolve_dtype(dt_name).quantized:   # a float checkpoint quantized on load (runtime/quant/)
        from .quant import backend_for, prepare_model

        # a dtype or backend no on-load quantizer has is named before the plan's shape is
        backend = backend_for(dt_name, {_torch_device(compute_torch_device(plan, st.compute_device)).type
                                        for st in plan.stages}, prefer=quant_backend)
        if any(st.mode != "execute" for st in plan.stages):
            raise WorkloadError(f"--dtype {dt_name}: quantized on load, every stage must stay resident "
                                "(this plan streams some from host RAM or disk)")
        dt = torch_dtype(resolve_dtype(dt_name).compute)
        model = build_empty_model(config, dt)
        quant = _Quant(backend, dt, frozenset(prepare_model(model, backend, dt)))
    else:
        _no_quant_backend(quant_backend, dt_name)
        dt = torch_dtype(dt_name)
        model = build_empty_model(config, dt)
    gen = folder / "generation_config.json"
    if gen.is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    ckpt = Checkpoint(folder)
    try:
        if prequant is not None:
            sources = _checkpoint_sources(model, ckpt, {n: _Source() for n in prequant.weights}, prequant.keys)
        else:
            sources = _checkpoint_sources(model, ckpt)
    except BaseException:
        ckpt.close()
        raise
    return _place(model, plan, sources, ckpt, offload_dir, free_on_error=True, progress=progress, quant=quant)


def _prequantized(folder: Path, plan: Plan) -> Any:
    """The bitsandbytes weights of a pre-quantized checkpoint (``quantization_config``), None for a
    float one; one line where its kernels' package or device is missing, or the plan streams."""
    from ..models.checkpoint import read_config
    from .quant.prequantized import check_prequantized, prequantized_method, scan_prequantized

    config = read_config(folder / "config.json")
    method = prequantized_method(config)
    if method is None:
        return None
    check_prequantized(method, {_torch_device(compute_torch_device(plan, st.compute_device)).type
                                for st in plan.stages})
    if any(st.mode != "execute" for st in plan.stages):
        raise WorkloadError(f"a checkpoint quantized with {method!r}: every stage must stay resident "
                            "(this plan streams some from host RAM or disk)")
    from .checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    try:
        return scan_prequantized(ckpt, config)
    finally:
        ckpt.close()


def load_module(module: nn.Module, devices: Any = "auto", plan: Plan | None = None,
                offload_dir: str | None = None, progress: LoadProgress | None = None,
                **plan_kwargs: Any) -> nn.Module:
    """Split an already built module in place per ``plan`` (made here when not given)."""
    if plan is None:
        from ..plan.planner import plan as make_plan

        plan = make_plan(module, devices=devices, **plan_kwargs)
    plan.validate()
    cfg = getattr(module, "config", None)
    check_identity(plan, cfg.to_dict() if hasattr(cfg, "to_dict") else None, type(module).__name__)
    module.eval()
    module.requires_grad_(False)
    sources = {n: _Source(tensor=t.detach()) for n, t in module.state_dict(keep_vars=True).items()}
    return _place(module, plan, sources, None, offload_dir, free_on_error=False, progress=progress)


def load_gguf(path: str | os.PathLike, plan: Plan, dtype: str | None = None,
              offload_dir: str | None = None, progress: LoadProgress | None = None) -> nn.Module:
    """Build the model of the GGUF file ``path`` on meta with its weights kept as GGUF blocks
    (runtime/gguf/) and load it per ``plan``. ``dtype``: the compute dtype the blocks are
    dequantized to (default: float32 on CPUs, bfloat16 when a stage runs on a GPU)."""
    from .gguf.load import (
        check_plan_dtype,
        compute_dtype,
        gguf_model_config,
        keep_quantized,
        loaded_note,
        open_gguf,
        plan_config,
    )

    plan.validate()
    check_identity(plan, plan_config(path), str(path))
    check_plan_dtype(plan, path)
    dt = compute_dtype(dtype, plan)
    config = gguf_model_config(path)
    gf = open_gguf(path)
    model = build_empty_model(config, dt)
    sources = {name: _Source(convert=read) for name, read in keep_quantized(model, gf, dt).items()}
    model = _place(model, plan, sources, None, offload_dir, free_on_error=True, progress=progress)
    model.vramancer.notes.append(loaded_note(gf, dt))
    if plan.workload.kv_dtype is None and dt.itemsize != 2:
        model.vramancer.kv_dtype = "float16"   # llama.cpp's cache, what a GGUF profile budgets (models/gguf_file.py)
    return model


def _no_quant_backend(quant_backend: str | None, dtype_name: str) -> None:
    """``--quant-backend`` on a load that quantizes nothing: refused, not ignored."""
    if quant_backend is not None:
        raise WorkloadError(f"--quant-backend {quant_backend} chooses who quantizes a float checkpoint on load "
                            f"(--dtype nf4, int4, int8); these weights load as {dtype_name}: drop it")


def load(model: Any, devices: Any = "auto", plan: Plan | None = None, *, dtype: str | None = None,
         offload_dir: str | None = None, progress: LoadProgress | None = None, quant_backend: str | None = None,
         **plan_kwargs: Any) -> nn.Module:
    """Load ``model`` (a transformers folder, a name the resolver finds locally, or an nn.Module) split
    over ``devices`` per ``plan`` (planned here with ``plan_kwargs`` when not given). The result keeps
    the transformers interface and carries the runtime as ``model.vramancer``. ``progress``: a
    LoadProgress (runtime/progress.py) told of every tensor placed; ``quant_backend``: see load_folder."""
    from torch import nn

    if getattr(model, "vramancer", None) is not None:
        raise BadInputError("this model is already split; call model.vramancer.detach() first")
    if isinstance(model, nn.Module):
        _no_quant_backend(quant_backend, "the module's own dtypes")
        if dtype is not None:  # an nn.Module is planned and loaded in the dtype it has
            model.to(torch_dtype(dtype))
        return load_module(model, devices=devices, plan=plan, offload_dir=offload_dir, progress=progress,
                           **plan_kwargs)
    from .gguf.load import is_gguf

    if is_gguf(model):  # a llama.cpp file: weights kept quantized; dtype is the compute dtype
        _no_quant_backend(quant_backend, "their GGUF types")
        if plan is None:
            from ..plan.planner import plan as make_plan

            plan = make_plan(str(model), devices=devices, **plan_kwargs)
        return load_gguf(model, plan, dtype=dtype, offload_dir=offload_dir, progress=progress)
    folder = weights_folder(model)
    if plan is None:
        from ..plan.planner import plan as make_plan

        plan = make_plan(str(folder), devices=devices, dtype=dtype, **plan_kwargs)
    elif dtype is not None and resolve_dtype(dtype).name != resolve_dtype(plan.workload.dtype).name:
        raise WorkloadError(f"dtype {dtype} differs from the plan's {plan.workload.dtype}")
    return load_folder(folder, plan, dtype=dtype, offload_dir=offload_dir, model_ref=folder, progress=progress,
                       quant_backend=quant_backend)
