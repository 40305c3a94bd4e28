"""One pipeline stage of a plan, built on its own: only its block range, as a small model of the
same architecture.

A stage that holds repeated layers ``a .. b-1`` is a model of the same config with
``num_hidden_layers = b - a`` (per-layer lists such as ``layer_types`` sliced), whose layer ``i`` gets
the checkpoint's layer ``a + i``. The model's own forward then builds masks, positions, rotary
tables and its KV cache exactly as the whole model does (its cache holds only its layers, so the
cache length it reads is its own), and two pre-hooks cut its forward to the stage:

* entry: a stage that does not hold block 0 gets the previous stage's hidden states; the model is
  called with ``inputs_embeds`` and a pre-hook on its first layer (on the final norm when it holds
  no layer) hands that layer exactly the tensor received, whatever the model does to its inputs
  before the layers (Gemma scales them);
* exit: a stage that does not hold the last block stops at the final norm's pre-hook and returns
  the hidden states that norm would have normalised; the last stage runs the norm and the LM head
  and returns the logits of the last position.

So each layer runs the same operations on the same inputs as in one process: greedy output over
several nodes equals the single-process split.

    st = StageModel.from_folder("./model", plan, stage=1)     # or from_tensors(config, plan, 1, tensors)
    h = st.forward(hidden, start=0)                          # [1, T, H] in, [1, T, H] (or logits) out
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..plan.plan import Plan

__all__ = ["StageBlocks", "StageModel", "stage_blocks", "stage_tensor_names", "read_stage_tensors"]

_PER_LAYER_LISTS = ("layer_types",)


@dataclass(frozen=True)
class StageBlocks:
    """What stage ``index`` of a plan holds: ``first`` (block 0: embeddings), ``last`` (the last
    block: final norm and LM head), and its repeated layers ``layers`` (model layer indices, in
    order) under ``layers_prefix`` (e.g. "model.layers")."""

    index: int
    blocks: tuple[int, int]
    first: bool
    last: bool
    layers: tuple[int, ...]
    layers_prefix: str
    head_modules: tuple[str, ...]     # the last block's module prefixes (final norm, LM head)


_LAYER_RE = re.compile(r"^(.*)\.(\d+)$")


def stage_blocks(plan: Plan, index: int) -> StageBlocks:
    """The blocks of stage ``index`` of ``plan`` (layer indices from the plan's block modules)."""
    if not 0 <= index < len(plan.stages):
        raise BadInputError(f"the plan has stages 0..{len(plan.stages) - 1}, not {index}")
    st = plan.stages[index]
    a, b = st.blocks
    n = len(plan.blocks)
    layers: list[int] = []
    prefixes = set()
    for blk in plan.blocks[1:n - 1]:
        mods = list(getattr(blk, "modules", ()) or ())
        m = _LAYER_RE.match(mods[0]) if len(mods) == 1 else None
        if m is None:
            raise BadInputError(f"plan block {blk.name}: a stage of a cluster runs blocks that are one "
                                "repeated layer each")
        prefixes.add(m.group(1))
    if len(prefixes) > 1:
        raise BadInputError(f"the plan's layers live under several prefixes ({', '.join(sorted(prefixes))})")
    prefix = prefixes.pop() if prefixes else ""
    for bi in range(max(a, 1), min(b, n - 1)):
        mod = plan.blocks[bi].modules[0]
        layers.append(int(_LAYER_RE.match(mod).group(2)))  # type: ignore[union-attr]
    head = tuple(getattr(plan.blocks[n - 1], "modules", ()) or ())
    return StageBlocks(index, (a, b), a == 0, b == n, tuple(layers), prefix, head)


def _sub_config(config: Any, layers: tuple[int, ...]) -> Any:
    """``config`` with only ``layers`` (renumbered 0..n-1): ``num_hidden_layers`` and every per-layer
    list (``layer_types``, Llama 4's ``no_rope_layers``, ...: a list with one item per layer) sliced."""
    sub = copy.deepcopy(config)
    total = int(config.num_hidden_layers)
    sub.num_hidden_layers = len(layers)
    names = set(_PER_LAYER_LISTS)
    if total > 1:
        names |= {k for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == total
                  and k not in ("architectures",)}
    for name in sorted(names):
        val = getattr(config, name, None)
        if isinstance(val, (list, tuple)) and len(val) == total:
            setattr(sub, name, [val[i] for i in layers])
    return sub


def _rename(name: str, blocks: StageBlocks) -> str | None:
    """The sub-model's name of checkpoint tensor ``name``; None for a layer this stage lacks."""
    p = blocks.layers_prefix
    for cand_prefix in (p, p.split(".", 1)[1] if "." in p else None):
        if cand_prefix and name.startswith(cand_prefix + "."):
            rest = name[len(cand_prefix) + 1:]
            idx, _, tail = rest.partition(".")
            if not idx.isdigit():
                continue
            i = int(idx)
            if i not in blocks.layers:
                return None
            return f"{cand_prefix}.{blocks.layers.index(i)}.{tail}"
    return name


def stage_tensor_names(folder: str | Path, plan: Plan, index: int) -> list[str]:
    """The checkpoint tensors stage ``index`` loads (its blocks' and the tied ones they use)."""
    from ..hub.bridge import stage_names

    return stage_names(folder, plan, [index])


def read_stage_tensors(folder: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors ``names`` read from the safetensors files of a local checkpoint folder."""
    from safetensors import safe_open

    from ..hub.bridge import checkpoint_tensors

    where = checkpoint_tensors(folder)
    missing = [n for n in names if n not in where]
    if missing:
        raise BadInputError(f"{folder}: the checkpoint has no tensor {missing[0]!r}")
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(str(where[n].file), []).append(n)
    out = {}
    for f, ns in by_file.items():
        with safe_open(f, framework="pt") as sf:
            for n in ns:
                out[n] = sf.get_tensor(n)
    return out


class _StageDone(Exception):
    def __init__(self, hidden: Any) -> None:
        super().__init__("stage done")
        self.hidden = hidden


class StageModel:
    """The model of one stage: built on meta, its tensors assigned, run with ``forward``."""

    def __init__(self, model: nn.Module, blocks: StageBlocks, device: torch.device) -> None:
        self.model = model
        self.blocks = blocks
        self.device = device
        self.cache: Any = None
        self._pending: Any = None
        self._handles: list[Any] = []
        base = getattr(model, model.base_model_prefix, model)
        self.base = base
        layers = model.get_submodule(self._sub_layers_prefix()) if blocks.layers else None
        head = model.get_output_embeddings()
        norms = [model.get_submodule(_strip(m, model)) for m in blocks.head_modules
                 if model.get_submodule(_strip(m, model)) is not head]
        if not norms:
            raise BadInputError("the model's last block has no final norm before its LM head")
        self._norm = norms[0]
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if not blocks.first:
            entry = layers[0] if layers is not None and len(layers) else self._norm
            self._handles.append(entry.register_forward_pre_hook(self._enter, with_kwargs=True))
        if not blocks.last:
            self._handles.append(self._norm.register_forward_pre_hook(self._exit, with_kwargs=True))

    def _sub_layers_prefix(self) -> str:
        return _strip(self.blocks.layers_prefix, self.model)

    # -- hooks --------------------------------------------------------------------------------
    def _enter(self, module: Any, args: tuple, kwargs: dict):
        h = self._pending
        self._pending = None
        if h is None:
            return None
        if args:
            return (h, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h
        return args, kwargs

    def _exit(self, module: Any, args: tuple, kwargs: dict):
        raise _StageDone(args[0] if args else kwargs["hidden_states"])

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, config: Any, plan: Plan, index: int, tensors: dict[str, torch.Tensor],
                     device: str = "cpu") -> StageModel:
        """Stage ``index`` of ``plan`` for the transformers ``config``, with its checkpoint tensors."""
        import torch

        from ..runtime.loader import build_empty_model, torch_dtype

        blocks = stage_blocks(plan, index)
        dtype = torch_dtype(plan.workload.dtype)
        dev = torch.device(device)
        sub_cfg = _sub_config(config, blocks.layers)
        model = build_empty_model(sub_cfg, dtype)
        state: dict[str, torch.Tensor] = {}
        known = dict(model.state_dict(keep_vars=True))
        for name, t in tensors.items():
            new = _rename(name, blocks)
            if new is None:
                continue
            new = _match(new, known)
            if new is None:
                raise BadInputError(f"checkpoint tensor {name!r} has no place in the stage's model")
            want = known[new]
            if tuple(want.shape) != tuple(t.shape):
                raise BadInputError(f"checkpoint tensor {name!r} is {list(t.shape)}, the model wants "
                                    f"{list(want.shape)}")
            state[new] = t.to(device=dev, dtype=want.dtype if want.is_floating_point() else t.dtype)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        if not blocks.first:
            _placeholders(model, plan, dev)
        for name, buf in list(model.named_buffers()):
            if buf.device != dev and buf.device.type != "meta":
                owner, attr = _owner(model, name)
                owner._buffers[attr] = buf.to(dev)
        st = cls(model, blocks, dev)
        st._check_loaded()
        return st

    @classmethod
    def from_folder(cls, folder: str | Path, plan: Plan, index: int, device: str = "cpu") -> StageModel:
        """Stage ``index`` of ``plan`` from a local copy of the checkpoint (only its tensors are read)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        names = stage_tensor_names(folder, plan, index)
        return cls.from_tensors(config, plan, index, read_stage_tensors(folder, names), device)

    def _check_loaded(self) -> None:
        """Every parameter this stage runs is loaded (not meta)."""
        used: list[Any] = []
        b = self.blocks
        if b.layers:
            used.append(self.model.get_submodule(self._sub_layers_prefix()))
        if b.last:
            used.append(self._norm)
            head = self.model.get_output_embeddings()
            if head is not None:
                used.append(head)
        if b.first:
            emb = self.model.get_input_embeddings()
            if emb is not None:
                used.append(emb)
        for mod in used:
            for name, p in mod.named_parameters():
                if p.device.type == "meta":
                    raise BadInputError(f"stage {b.index}: parameter {name} was not in the tensors it got")

    # -- running ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache (a new sequence starts)."""
        self.cache = None

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Token ids [1, T] (first stage) or hidden states [1, T, H] in; hidden states [1, T, H] out,
        or the last position's logits [1, V] (float32) from the last stage. ``start``: tokens already
        in this stage's cache (0 starts a new sequence)."""
        import torch

        if start == 0:
            self.reset()
        tokens = x.shape[1]
        pos = torch.arange(start, start + tokens, device=self.device).unsqueeze(0)
        kw: dict[str, Any] = {"position_ids": pos, "use_cache": bool(self.blocks.layers)}
        if self.blocks.layers:
            if self.cache is None:
                from transformers import DynamicCache

                self.cache = DynamicCache(config=self.model.config)
            if self.cache.get_seq_length() != start:
                raise BadInputError(f"stage {self.blocks.index}: asked to continue at token {start}, its cache "
                                    f"holds {self.cache.get_seq_length()}")
            kw[self._cache_kw] = self.cache
        x = x.to(self.device)
        if self.blocks.first:
            kw["input_ids"] = x
        else:
            self._pending = x
            kw["inputs_embeds"] = x
        try:
            with torch.no_grad():
                if self.blocks.last:
                    out = self.model(**kw, logits_to_keep=1)
                    return out.logits[:, -1, :].float()
                self.base(**kw)
        except _StageDone as done:
            return done.hidden
        finally:
            self._pending = None
        raise BadInputError(f"stage {self.blocks.index}: the model never reached its final norm")

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.cache = None


def _placeholders(model: Any, plan: Plan, dev: torch.device) -> None:
    """A stage without block 0 still runs block 0's modules other than the token embedding (GPT-2
    adds its position embeddings to ``inputs_embeds``); their output is replaced at the stage's
    entry, so they run on zeros of their shape instead of weights it never loads."""
    import torch

    emb = model.get_input_embeddings()
    for m in getattr(plan.blocks[0], "modules", ()) or ():
        try:
            mod = model.get_submodule(_strip(m, model))
        except BadInputError:
            continue
        if mod is emb:
            continue
        for sub in mod.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                if p.device.type == "meta":
                    sub._parameters[name] = torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=dev),
                                                               requires_grad=False)


def _strip(name: str, model: Any) -> str:
    """A checkpoint module name as a submodule name of ``model`` (base-model prefix added or removed)."""
    try:
        model.get_submodule(name)
        return name
    except AttributeError:
        pass
    prefix = getattr(model, "base_model_prefix", "")
    for cand in ((name.split(".", 1)[1] if "." in name else name), f"{prefix}.{name}"):
        try:
            model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    raise BadInputError(f"the model has no module {name!r}")


def _match(name: str, known: dict[str, Any]) -> str | None:
    if name in known:
        return name
    for cand in [k for k in known if k.endswith("." + name)] + ([name.split(".", 1)[1]] if "." in name else []):
        if cand in known:
            return cand
    return None


def _owner(model: Any, name: str) -> tuple[Any, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr
