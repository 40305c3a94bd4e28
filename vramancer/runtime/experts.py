"""MoE routed experts kept in host RAM and computed there, while the rest of their layer (attention,
norms, router, shared experts) runs on the layer's GPU: what the plan says with
``PlanBlock.experts_device`` (plan/experts.py; llama.cpp's ``--n-cpu-moe``).

The loader puts every tensor of such a block's experts module on the host's torch device; an
``ExpertsHooks`` then wraps each of those modules. A decode forward (fewer than
``PHASE_PREFILL_TOKENS`` routed tokens) runs on the host: a pre-hook moves its tensor inputs (hidden
states of the routed tokens, top-k indices and weights) there, a forward hook moves its output back
to the layer's device; two hops of a few tokens, the weights stay put. A prefill forward (as many
tokens or more; compute-bound) copies the module's weights to the layer's device, runs there, and
drops the copy after (llama.cpp does the same for large batches); the plan keeps room for one such
copy on each GPU.

On the host, a decode forward of transformers' fused experts (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I], its default ``grouped_mm`` implementation) runs ``host_experts_forward``:
the same arithmetic as transformers' grouped path on a CPU (rows sorted by expert, one ``torch.mm``
per expert, the routing weights, the sum over the top k in their order: bit for bit its result), but
over the selected experts only. Transformers' path materializes every expert's weight each forward,
so weights kept as GGUF blocks (runtime/gguf) were dequantized for all E experts where only the top
k are read: here only the selected experts' rows are dequantized; and its Python loop runs over all
E experts (histogram, offsets), where this one runs over the k selected.

    hooks = ExpertsHooks(experts).attach()   # SplitRuntime.attach() does this
    hooks.stats                              # forwards and bytes moved each way
    hooks.detach()
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError
from .boundary import BoundaryStats, move_tensors

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    import torch
    from torch import nn

    from ..plan.plan import Plan

__all__ = ["HostExperts", "ExpertsStats", "ExpertsHooks", "experts_module_name", "host_experts_modules",
           "host_experts_forward", "runs_host_path"]


@dataclass
class HostExperts:
    """One MoE layer's routed experts in host RAM: ``name`` (the model's module name) of block
    ``block``, living and running on ``device`` (a host torch device; plan device ``plan_device``),
    returning its output to ``return_device`` (the torch device its layer runs on); the plan gives
    it ``planned_bytes`` of weights."""

    block: int
    name: str
    module: nn.Module
    device: torch.device
    return_device: torch.device
    plan_device: str
    planned_bytes: int


@dataclass
class ExpertsStats:
    """Forwards through host experts (on the host; ``copied_forwards`` of them prefills run on the
    layer's device with the weights copied there; ``host_path_forwards`` of them run by
    host_experts_forward), and bytes moved: inputs to the host, outputs back, weights copied."""

    forwards: int = 0
    copied_forwards: int = 0
    host_path_forwards: int = 0
    cpu_layer_forwards: int = 0      # decode forwards of experts whose whole layer runs on the host
    to_host_bytes: int = 0
    back_bytes: int = 0
    copied_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _renamed(name: str, model: nn.Module) -> str:
    """``name`` through transformers' checkpoint -> model renamings (``block_sparse_moe`` -> ``mlp``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # pragma: no cover - older transformers: names are the model's
        return name
    out = "." + name + "."
    for m in get_model_conversion_mapping(model):
        if not isinstance(m, WeightRenaming):
            continue
        srcs, tgts = list(m.source_patterns), list(m.target_patterns)
        if len(tgts) != len(srcs):
            tgts = tgts[:1] * len(srcs)
        for src, tgt in zip(srcs, tgts):
            out = re.sub(src, tgt, out)
    return out.strip(".")


def experts_module_name(model: nn.Module, experts_module: str, block_modules: list[str]) -> str:
    """The model's module name for a plan's ``experts_module`` (the profile may name it as the
    checkpoint does: ``model.layers.3.block_sparse_moe.experts`` for ``model.layers.3.mlp.experts``).
    BadInputError (one line) when no module of the block is it."""
    for cand in dict.fromkeys((experts_module, _renamed(experts_module, model))):
        try:
            model.get_submodule(cand)
        except AttributeError:
            continue
        if any(cand == p or cand.startswith(p + ".") for p in block_modules):
            return cand
    # the one module named "experts" inside the block (per-expert checkpoints fused by transformers)
    found = [n for p in block_modules for n, _ in model.get_submodule(p).named_modules(prefix=p)
             if n.rsplit(".", 1)[-1] == "experts"]
    if len(found) == 1:
        return found[0]
    raise BadInputError(f"the plan keeps MoE experts {experts_module!r} in host RAM, but "
                        f"{type(model).__name__} has no such module in {', '.join(block_modules)}; "
                        "was the plan made for another model?")


def host_experts_modules(plan: Plan, model: nn.Module) -> dict[int, tuple[str, str]]:
    """{block index: (the model's experts module name, plan host device id)} for every block whose
    routed experts the plan keeps in host RAM."""
    out: dict[int, tuple[str, str]] = {}
    for b, blk in enumerate(plan.blocks):
        if blk.experts_device is None:
            continue
        out[b] = (experts_module_name(model, blk.experts_module or "", list(blk.modules)), blk.experts_device)
    return out


def runs_host_path(module: nn.Module) -> bool:
    """Whether ``host_experts_forward`` computes exactly what ``module``'s own forward does: transformers'
    fused gated experts without biases, transposition or post-norm, on its ``grouped_mm`` implementation."""
    def get(name: str, default: Any = None) -> Any:
        return getattr(module, name, default)

    gu, down = _weight_shape(module, "gate_up_proj"), _weight_shape(module, "down_proj")
    cfg = get("config")
    return (gu is not None and down is not None and len(gu) == 3 and len(down) == 3
            and gu[0] == down[0] and gu[2] == down[1] and gu[1] == 2 * down[2]
            and get("has_gate") is True and get("has_bias") is False and get("is_transposed") is False
            and get("is_concatenated", True) is True and not get("has_post_expert_norm", False)
            and not get("_is_expert_parallel", False) and callable(get("_apply_gate"))
            and getattr(cfg, "_experts_implementation", None) == "grouped_mm")


def _weight_shape(module: nn.Module, name: str) -> tuple[int, ...] | None:
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        shape = getattr(plist[0], "shape", None) if len(plist) == 1 else None
        return tuple(shape) if shape is not None else None
    w = getattr(module, name, None)
    return tuple(w.shape) if w is not None and hasattr(w, "shape") else None


def _expert_weight(module: nn.Module, name: str, e: int, whole: dict) -> torch.Tensor:
    """Expert ``e``'s weight ``name`` [rows, cols]: of weights kept as GGUF blocks only that expert's
    rows dequantized (a parametrization with ``expert(stored, e)``, or runtime/gguf's GGUFWeight);
    any other parametrization materialized once per forward (``whole``)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, name):
        return getattr(module, name)[e]
    plist = module.parametrizations[name]
    p = plist[0]
    if len(plist) == 1 and hasattr(p, "expert"):
        return p.expert(plist.original, e)
    from .gguf.modules import GGUFWeight

    if len(plist) == 1 and type(p) is GGUFWeight:
        import torch

        from .gguf.dequant import dequantize

        stored = plist.original[e]
        w = dequantize(stored, p.qtype) if stored.dtype == torch.uint8 else stored
        return w.reshape(p.shape[1:]).to(p.dtype)
    if name not in whole:
        whole[name] = getattr(module, name)
    return whole[name][e]


def host_experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """``module``'s forward (``runs_host_path(module)``) on the CPU over its selected experts only:
    transformers' ``grouped_mm_experts_forward`` with its CPU fallback (``torch.mm`` per expert group
    of rows), step for step, the per-expert weights read for the selected experts alone."""
    import torch

    k = top_k_index.size(-1)
    tokens, hidden = hidden_states.size(0), hidden_states.size(-1)
    if tokens == 1:
        return _one_token(module, hidden_states, top_k_index, top_k_weights)
    ids_g, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // k]
    w_g = top_k_weights.reshape(-1)[perm]
    groups: list[tuple[int, int, int]] = []     # (expert, first row, end row) in expert order
    for row, e in enumerate(ids_g.tolist()):
        if groups and groups[-1][0] == e:
            groups[-1] = (e, groups[-1][1], row + 1)
        else:
            groups.append((e, row, row + 1))
    if not groups:
        return torch.zeros_like(hidden_states)
    whole: dict = {}
    gate_up = [(a, b, _expert_weight(module, "gate_up_proj", e, whole)) for e, a, b in groups]
    dtype = gate_up[0][2].dtype
    x = x.to(dtype)
    proj = torch.zeros(x.size(0), gate_up[0][2].shape[0], device=x.device, dtype=dtype)
    for a, b, w in gate_up:
        torch.mm(x[a:b], w.transpose(-2, -1), out=proj[a:b])
    proj = module._apply_gate(proj)
    out = torch.zeros(proj.size(0), hidden, device=x.device, dtype=dtype)
    for e, a, b in groups:
        w = _expert_weight(module, "down_proj", e, whole)
        torch.mm(proj[a:b].to(w.dtype), w.transpose(-2, -1), out=out[a:b])
    weighted = out * w_g.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inv].view(tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)


def _one_token(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor:
    """host_experts_forward of one token: its k experts are distinct, so every group of transformers'
    grouped path is one row (the same one-row ``torch.mm`` in whatever order); the rows stay in top-k
    order, which makes the sort and its inverse permutation unnecessary (the same sum over k)."""
    import torch

    whole: dict = {}
    ids = top_k_index.reshape(-1).tolist()
    w_gu = [_expert_weight(module, "gate_up_proj", e, whole) for e in ids]
    dtype = w_gu[0].dtype
    x = hidden_states.to(dtype)
    proj = torch.zeros(len(ids), w_gu[0].shape[0], device=x.device, dtype=dtype)
    for j, w in enumerate(w_gu):
        torch.mm(x, w.transpose(-2, -1), out=proj[j:j + 1])
    proj = module._apply_gate(proj)
    out = torch.zeros(len(ids), hidden_states.size(-1), device=x.device, dtype=dtype)
    for j, e in enumerate(ids):
        w = _expert_weight(module, "down_proj", e, whole)
        torch.mm(proj[j:j + 1].to(w.dtype), w.transpose(-2, -1), out=out[j:j + 1])
    weighted = out * top_k_weights.reshape(-1).unsqueeze(-1)
    return weighted.view(1, len(ids), -1).sum(dim=1).to(hidden_states.dtype)


@dataclass
class ExpertsHooks:
    """The hooks that run host experts on the host: attach() installs them, detach() removes them."""

    experts: list[HostExperts]
    prefill_tokens: int = 32       # plan.PHASE_PREFILL_TOKENS: forwards of this many tokens run on the GPU
    # experts modules of layers that run on the host whole (a CPU stage, a phase stage's decode): their
    # decode forwards on the host take host_experts_forward too (same result, selected experts only);
    # modules runs_host_path accepts (split._cpu_layer_experts picks them)
    cpu_layers: list[Any] = field(default_factory=list)
    stats: ExpertsStats = field(default_factory=ExpertsStats)
    _handles: list[Any] = field(default_factory=list)
    _homes: list[Any] = field(default_factory=list)   # (owner, attr, host parameter) while a copy runs
    _forwards: list[Any] = field(default_factory=list)   # modules whose forward is _host_forward's

    def _pre(self, ex: HostExperts):
        moved = BoundaryStats()

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            from .stream import forward_tokens

            self.stats.forwards += 1
            h = kwargs.get("hidden_states", args[0] if args else None)
            rows = int(h.shape[0]) if h is not None and h.dim() == 2 else forward_tokens(args, kwargs)
            if rows >= self.prefill_tokens:
                self._copy_in(ex)
                return None
            before = moved.copied_bytes
            out = move_tensors(args, ex.device, stats=moved), move_tensors(kwargs, ex.device, stats=moved)
            self.stats.to_host_bytes += moved.copied_bytes - before
            return out
        return hook

    def _post(self, ex: HostExperts):
        moved = BoundaryStats()

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if self._homes:
                self._copy_out()
                return output
            before = moved.copied_bytes
            out = move_tensors(output, ex.return_device, stats=moved)
            self.stats.back_bytes += moved.copied_bytes - before
            return out
        return hook

    def _copy_in(self, ex: HostExperts) -> None:
        """The module's parameters copied to its layer's device for this forward (homes kept)."""
        import torch
        from torch import nn

        with torch.no_grad():
            for name, p in list(ex.module.named_parameters()):
                owner = ex.module.get_submodule(name.rpartition(".")[0]) if "." in name else ex.module
                attr = name.rpartition(".")[2]
                copy = torch.empty_like(p, device=ex.return_device)
                copy.copy_(p, non_blocking=ex.return_device.type == "cuda")
                self._homes.append((owner, attr, p))
                setattr(owner, attr, nn.Parameter(copy, requires_grad=False))
                self.stats.copied_bytes += p.numel() * p.element_size()
        self.stats.copied_forwards += 1

    def _copy_out(self) -> None:
        for owner, attr, p in self._homes:
            setattr(owner, attr, p)
        self._homes.clear()

    def _decode_forward(self, module: nn.Module, own: Any, on_host: Callable[[Any], bool], counter: str):
        """``module``'s forward: host_experts_forward for a decode forward (fewer than ``prefill_tokens``
        routed tokens) whose hidden states ``on_host`` accepts, counted in ``stats.<counter>``; else its own."""
        def forward(hidden_states, top_k_index, top_k_weights):
            if (hidden_states.dim() == 2 and hidden_states.shape[0] < self.prefill_tokens
                    and on_host(hidden_states)):
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
                return host_experts_forward(module, hidden_states, top_k_index, top_k_weights)
            return own(hidden_states, top_k_index, top_k_weights)
        return forward

    def attach(self) -> ExpertsHooks:
        if self._handles or self._forwards:
            return self
        for m in self.cpu_layers:   # split._cpu_layer_experts: modules runs_host_path accepted
            if "forward" not in vars(m):
                m.forward = self._decode_forward(m, m.forward, lambda h: h.device.type == "cpu",
                                                 "cpu_layer_forwards")
                self._forwards.append(m)
        for ex in self.experts:
            if runs_host_path(ex.module) and "forward" not in vars(ex.module):
                ex.module.forward = self._decode_forward(
                    ex.module, ex.module.forward, lambda h, ex=ex: h.device == ex.device and not self._homes,
                    "host_path_forwards")
                self._forwards.append(ex.module)
            self._handles.append(ex.module.register_forward_pre_hook(self._pre(ex), with_kwargs=True))
            self._handles.append(ex.module.register_forward_hook(self._post(ex), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._forwards:
            vars(m).pop("forward", None)
        self._forwards.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._forwards)
