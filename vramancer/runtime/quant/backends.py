"""The on-load quantizers, one row per dtype.

``prepare_model`` swaps a meta-built model's ``nn.Linear`` layers (all but the LM head: embeddings,
norms and the head stay at the compute dtype, as transformers' bitsandbytes integration does) for
the backend's quantized layer, still on meta. The loader then reads each weight, casts it to the
compute dtype on its stage's device and quantizes it there (``QuantBackend.quantize``) before it
reads the next one: the peak is the quantized bytes plus one float tensor.

``quantized_param_bytes`` is the exact storage of a quantized weight (packed data + scales + code
table): what ``DType.weight_bytes`` predicts for its shape.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import WorkloadError
from ...models.dtypes import NF4_BLOCK, DType, resolve_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["QuantBackend", "BACKENDS", "backend_for", "prepare_model", "quantized_param_bytes"]


@dataclass(frozen=True)
class QuantBackend:
    """``package``: the pip package that holds the kernels; ``devices``: torch device types its
    kernels run on (here, with the installed version); ``make_layer(linear, compute)``: the
    quantized layer (on meta) replacing ``linear``; ``quantize(float_weight, device)``: the
    quantized Parameter on ``device``."""

    dtype: str
    package: str
    devices: tuple[str, ...]
    make_layer: Callable[[Any, Any], Any]
    quantize: Callable[[Any, Any], Any]


def _nf4_layer(linear: nn.Linear, compute: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             compute_dtype=compute, compress_statistics=False, quant_type="nf4",
                             device="meta")


def _nf4_quantize(w: torch.Tensor, device: torch.device) -> nn.Parameter:
    import bitsandbytes as bnb

    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=False,
                          blocksize=NF4_BLOCK)
    return p.to(device)


def _int8_layer(linear: nn.Linear, compute: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               has_fp16_weights=False, threshold=0.0, device="meta")


def _int8_quantize(w: torch.Tensor, device: torch.device) -> nn.Parameter:
    import bitsandbytes as bnb

    return bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)


BACKENDS: dict[str, QuantBackend] = {
    b.dtype: b
    for b in [
        QuantBackend("nf4", "bitsandbytes", ("cpu", "cuda"), _nf4_layer, _nf4_quantize),
        QuantBackend("int8", "bitsandbytes", ("cpu", "cuda"), _int8_layer, _int8_quantize),
    ]
}


def backend_for(dtype: str | DType, device_types: set[str]) -> QuantBackend:
    """The backend that quantizes ``dtype`` on load, checked installed and able to run on every
    device type in ``device_types``; one line (WorkloadError, exit 2) otherwise."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    b = BACKENDS.get(dt.name)
    if b is None:
        known = ", ".join(BACKENDS)
        raise WorkloadError(f"--dtype {dt.name} cannot be quantized on load of a float checkpoint "
                            f"(on-load quantization: {known}; GGUF files load their own {dt.name} blocks)")
    if importlib.util.find_spec(b.package) is None:
        raise WorkloadError(f"--dtype {dt.name} needs the {b.package} package: pip install 'vramancer[quant]'")
    missing = sorted(device_types - set(b.devices))
    if missing:
        raise WorkloadError(f"--dtype {dt.name}: {b.package} has no kernel for {', '.join(missing)} devices "
                            f"(it runs on {', '.join(b.devices)})")
    return b


def prepare_model(model: nn.Module, backend: QuantBackend, compute: torch.dtype) -> list[str]:
    """Swap every ``nn.Linear`` of the meta-built ``model`` but its LM head for ``backend``'s layer;
    returns the names of the weights to quantize on load."""
    import torch
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if type(child) is nn.Linear and child is not head:
                swaps.append((mod, child_name, backend.make_layer(child, compute)))
                names.append(f"{name}.{child_name}.weight" if name else f"{child_name}.weight")
    for parent, child_name, layer in swaps:
        if layer.bias is not None:   # biases stay float, at the compute dtype (the layers make them fp32)
            layer.bias = nn.Parameter(torch.empty_like(layer.bias, dtype=compute, device="meta"),
                                      requires_grad=False)
        setattr(parent, child_name, layer)
    return names


def quantized_param_bytes(p: torch.Tensor) -> int:
    """Bytes a weight holds: its own storage plus, for bitsandbytes weights, the scales and code
    table it carries (Params4bit.quant_state: absmax + code; Int8Params.SCB)."""
    n = p.numel() * p.element_size()
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            if t is not None:
                n += t.numel() * t.element_size()
        if getattr(qs, "state2", None) is not None:
            n += sum(t.numel() * t.element_size() for t in (qs.state2.absmax, qs.state2.code))
    scb = getattr(p, "SCB", None)
    if scb is not None:
        n += scb.numel() * scb.element_size()
    return n
