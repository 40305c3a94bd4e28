"""Pre-quantized Hugging Face checkpoints (``quantization_config`` in config.json), loaded split.

bitsandbytes checkpoints saved by transformers load weight by weight on their stage's device, as
stored: a 4-bit weight is its packed bytes (``X.weight``, uint8) + ``.absmax`` + ``.quant_map`` (and
``.nested_absmax`` / ``.nested_quant_map`` with double quantization) + a JSON blob of the rest
(``.quant_state.bitsandbytes__nf4``, parsed, not kept); an 8-bit weight is ``X.weight`` (int8) +
``X.SCB`` (fp32 row scales; ``X.weight_format`` is a legacy marker, not kept). The layers holding
them are found from those names (not from ``llm_int8_skip_modules``): every ``nn.Linear`` with
a quantized weight in the file becomes bitsandbytes' layer, the rest keep the stored float dtype.
The planner counts the same bytes (models/prequant.py).

GPTQ / AWQ / other methods: their kernels are other packages, some only for CUDA; where the package
or the device is missing, one line names what is needed (WorkloadError, exit 2).
"""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import WorkloadError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..checkpoint import Checkpoint

__all__ = ["PreQuantized", "prequantized_method", "check_prequantized", "scan_prequantized", "KERNEL_PACKAGES"]

# method -> (pip packages any of which runs it, device types its kernels run on)
KERNEL_PACKAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bitsandbytes": (("bitsandbytes",), ("cpu", "cuda")),
    "gptq": (("gptqmodel", "auto_gptq"), ("cuda",)),
    "awq": (("awq", "gptqmodel"), ("cuda",)),
}
_PIP = {"gptqmodel": "gptqmodel", "auto_gptq": "auto-gptq", "awq": "autoawq", "bitsandbytes": "bitsandbytes"}
_4BIT = re.compile(r"^(.*)\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def prequantized_method(config: dict | None) -> str | None:
    """The ``quant_method`` of a pre-quantized checkpoint's config, None for a float one."""
    q = (config or {}).get("quantization_config")
    if not isinstance(q, dict):
        return None
    return str(q.get("quant_method") or "unknown")


def check_prequantized(method: str, device_types: set[str]) -> None:
    """Refuse (one line) a pre-quantized checkpoint whose kernels' package or device is missing
    here: GPTQ / AWQ run on CUDA through their packages; a method the runtime has no path for is
    named."""
    if method not in KERNEL_PACKAGES:
        raise WorkloadError(f"a checkpoint quantized with {method!r}: the split runtime loads bitsandbytes "
                            f"checkpoints (and GGUF files); {method} is not supported")
    packages, devices = KERNEL_PACKAGES[method]
    missing_devices = sorted(device_types - set(devices))
    if missing_devices:
        raise WorkloadError(f"a checkpoint quantized with {method!r} needs its kernels on {', '.join(devices)} "
                            f"devices; this plan runs stages on {', '.join(missing_devices)} "
                            f"(plan on a GPU, or use a float, bitsandbytes or GGUF checkpoint)")
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise WorkloadError(f"a checkpoint quantized with {method!r} needs the "
                            f"{' or '.join(_PIP[p] for p in packages)} package: pip install {_PIP[packages[0]]}")
    if method != "bitsandbytes":
        raise WorkloadError(f"a checkpoint quantized with {method!r}: its kernels are installed, but the split runtime "
                            "loads only bitsandbytes pre-quantized checkpoints so far")


@dataclass
class PreQuantized:
    """What the loader needs: ``weights``: model weight name -> builder(checkpoint, device) of the
    quantized Parameter (reads its tensors from the open checkpoint, puts them on ``device``);
    ``layers``: module name -> maker of its bitsandbytes layer from the meta ``nn.Linear``;
    ``keys``: the checkpoint keys the builders consume (hidden from the name mapping);
    ``float_dtype``: the stored dtype of the tensors that stay float (the model is built in it)."""

    method: str
    weights: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    layers: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    keys: frozenset[str] = frozenset()
    float_dtype: Any = None

    def swap_layers(self, model: nn.Module) -> None:
        """Replace each quantized ``nn.Linear`` of the meta-built ``model`` by its bitsandbytes layer."""
        for name, make in self.layers.items():
            _swap(model, name, make)


def _float_dtype(ckpt: Checkpoint, skip: set[str]) -> torch.dtype:
    """The stored float dtype of the tensors that are not quantized (the most bytes of them)."""
    import torch

    from ..checkpoint import torch_dtype_of

    by: dict[torch.dtype, int] = {}
    stored = ckpt.keys()
    for k in stored:
        if k in skip:
            continue
        info = ckpt.info(k)
        dt = torch_dtype_of(info.dtype)
        if dt.is_floating_point:
            by[dt] = by.get(dt, 0) + info.nbytes
    return max(by, key=by.__getitem__) if by else torch.float32


def scan_prequantized(ckpt: Checkpoint, config: dict) -> PreQuantized:
    """The bitsandbytes weights of ``ckpt`` (found from their tensor names), their builders and
    the layers to swap."""
    import torch

    q = config.get("quantization_config") or {}
    keys = set(ckpt.keys())
    pq = PreQuantized("bitsandbytes")
    used: set[str] = set()
    compute = getattr(torch, str(q.get("bnb_4bit_compute_dtype") or "float32").replace("torch.", ""))
    # LLM.int8's outlier threshold: activations above it multiply in fp16 against dequantized rows
    threshold = float(q.get("llm_int8_threshold", 6.0) or 0.0)
    for key in sorted(keys):
        m4 = _4BIT.match(key)
        if m4:
            mod_name, quant_type = m4.group(1), m4.group(2)
            parts = {p: f"{mod_name}.weight.{p}" for p in _4BIT_PARTS if f"{mod_name}.weight.{p}" in keys}
            weight = f"{mod_name}.weight"
            pq.weights[weight] = _builder4(weight, key, parts)
            pq.layers[mod_name] = lambda lin, qt=quant_type: _layer4(lin, compute, qt)
            used |= {weight, key, *parts.values()}
        elif key.endswith(".SCB") and f"{key[:-4]}.weight" in keys:
            mod_name = key[:-4]
            weight = f"{mod_name}.weight"
            pq.weights[weight] = _builder8(weight, key)
            pq.layers[mod_name] = lambda lin, th=threshold: _layer8(lin, th)
            used |= {weight, key}
            if f"{mod_name}.weight_format" in keys:
                used.add(f"{mod_name}.weight_format")
    if not pq.weights:
        raise WorkloadError("a bitsandbytes checkpoint without bitsandbytes weights (no .absmax / .SCB tensors): "
                            "re-save it with transformers")
    pq.keys = frozenset(used)
    pq.float_dtype = _float_dtype(ckpt, used)
    return pq


def _swap(model: nn.Module, mod_name: str, make: Callable[[Any], Any]) -> None:
    from torch import nn

    parent_name, _, child = mod_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
    except AttributeError:
        raise WorkloadError(f"quantized weight {mod_name}.weight: the model has no module {mod_name}") from None
    if type(lin) is not nn.Linear:
        raise WorkloadError(f"quantized weight {mod_name}.weight: {mod_name} is a {type(lin).__name__}, "
                            "not a Linear layer bitsandbytes can run")
    layer = make(lin)
    if lin.bias is not None:   # the bias stays as built (the stored float dtype)
        layer.bias = lin.bias
    setattr(parent, child, layer)


def _layer4(lin: nn.Linear, compute: torch.dtype, quant_type: str) -> nn.Module:
    import bitsandbytes as bnb

    from .backends import keep_cpu_layout

    return keep_cpu_layout(bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                             compute_dtype=compute, quant_type=quant_type, device="meta"))


def _layer8(lin: nn.Linear, threshold: float) -> nn.Module:
    from .backends import int8_layer

    return int8_layer(lin.in_features, lin.out_features, lin.bias is not None, threshold)


def _builder4(weight: str, state_key: str, parts: dict[str, str]) -> Callable[[Any, Any], Any]:
    def build(ckpt: Checkpoint, device: torch.device) -> nn.Parameter:
        import bitsandbytes as bnb

        stats = {f"weight.{p}": ckpt.read(k) for p, k in parts.items()}
        stats[state_key.split(f"{weight}.", 1)[1]] = ckpt.read(state_key)
        return bnb.nn.Params4bit.from_prequantized(ckpt.read(weight), stats, requires_grad=False, device=device)
    return build


def _builder8(weight: str, scb_key: str) -> Callable[[Any, Any], Any]:
    def build(ckpt: Checkpoint, device: torch.device) -> nn.Parameter:
        import bitsandbytes as bnb

        data = ckpt.read(weight).to(device)
        # CB: the int8 rows the matmul reads (the same storage as the data, as bitsandbytes' own quantizer leaves it)
        return bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data,
                                 SCB=ckpt.read(scb_key).to(device))
    return build
