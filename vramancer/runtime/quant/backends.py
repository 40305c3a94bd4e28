"""The on-load quantizers, one row per (dtype, package).

``nf4`` / ``int4`` / ``int8`` quantize through bitsandbytes (NF4, FP4 and LLM.int8 weights, CPU and
CUDA kernels); ``int8`` also through torchao (``Int8Tensor``: int8 weights + one fp32 scale per
row, weight-only, CPU and CUDA), chosen with ``prefer="torchao"`` or when bitsandbytes is missing.
torchao's packed int4 weight-only kernels need CUDA and its ``mslk`` package (none run on x86
CPUs with torchao 0.18), so ``int4`` is bitsandbytes' FP4: 4-bit floats in blocks of 64 with an
fp32 absmax, the same bytes as NF4. Every row of a dtype stores the same bytes for a weight shape
(``DType.weight_bytes``), whichever package the plan's devices get.

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

__all__ = ["QuantBackend", "BACKEND_ROWS", "BACKENDS", "PACKAGES", "backend_for", "prepare_model",
           "quantized_param_bytes", "keep_cpu_layout", "int8_layer"]


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
    note: str = ""


def keep_cpu_layout(layer: nn.Module) -> nn.Module:
    """A bitsandbytes 4-bit layer that keeps its weight as stored, in eval mode: on CPUs with
    AVX512-BF16, bitsandbytes repacks an eval-mode layer's weight at its first forward (absmax
    transposed to bf16, double quantization undone), which would change the bytes it holds from
    the plan's (and fails for layers narrower than a block)."""
    layer.support_avx512bf16_for_cpu = False
    return layer.eval()


def _4bit_layer(quant_type: str) -> Callable[[Any, Any], Any]:
    def make(linear: nn.Linear, compute: torch.dtype) -> nn.Module:
        import bitsandbytes as bnb

        return keep_cpu_layout(bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                                 bias=linear.bias is not None, compute_dtype=compute,
                                                 compress_statistics=False, quant_type=quant_type, device="meta"))
    return make


def _4bit_quantize(quant_type: str) -> Callable[[Any, Any], Any]:
    def quantize(w: torch.Tensor, device: torch.device) -> nn.Parameter:
        import bitsandbytes as bnb

        p = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=False,
                              blocksize=NF4_BLOCK)
        return p.to(device)
    return quantize


_INT8_CLASS: list[type] = []


def int8_layer(in_features: int, out_features: int, bias: bool, threshold: float) -> nn.Module:
    """bitsandbytes' ``Linear8bitLt`` (eval mode, int8 weights) whose weight keeps its row scales:
    at its first forward bitsandbytes moves ``weight.SCB`` into the layer's matmul state and sets
    it None on the weight, so a count of the weight's bytes would lose the scales it still holds;
    here the weight keeps a reference to the same tensor."""
    if not _INT8_CLASS:
        import bitsandbytes as bnb

        class Linear8bit(bnb.nn.Linear8bitLt):
            def init_8bit_state(self) -> None:
                scb = self.weight.SCB
                super().init_8bit_state()
                self.weight.SCB = scb

        _INT8_CLASS.append(Linear8bit)
    return _INT8_CLASS[0](in_features, out_features, bias=bias, has_fp16_weights=False, threshold=threshold,
                          device="meta").eval()


def _int8_layer(linear: nn.Linear, compute: torch.dtype) -> nn.Module:
    return int8_layer(linear.in_features, linear.out_features, linear.bias is not None, 0.0)


def _int8_quantize(w: torch.Tensor, device: torch.device) -> nn.Parameter:
    import bitsandbytes as bnb

    return bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)


def _keep_linear(linear: nn.Linear, compute: torch.dtype) -> nn.Module:
    """torchao keeps ``nn.Linear``: its weight becomes a quantized tensor subclass."""
    return linear


def _ao_int8_quantize(w: torch.Tensor, device: torch.device) -> nn.Parameter:
    import torch
    from torch import nn

    from .torchao_compat import int8_weight

    with torch.no_grad():
        return nn.Parameter(int8_weight(w.to(device)), requires_grad=False)


BACKEND_ROWS: tuple[QuantBackend, ...] = (
    QuantBackend("nf4", "bitsandbytes", ("cpu", "cuda"), _4bit_layer("nf4"), _4bit_quantize("nf4")),
    QuantBackend("int4", "bitsandbytes", ("cpu", "cuda"), _4bit_layer("fp4"), _4bit_quantize("fp4"),
                 note="bitsandbytes FP4 (torchao's int4 kernels need CUDA and mslk)"),
    QuantBackend("int8", "bitsandbytes", ("cpu", "cuda"), _int8_layer, _int8_quantize),
    QuantBackend("int8", "torchao", ("cpu", "cuda"), _keep_linear, _ao_int8_quantize),
)
# the first row of each dtype: the default package
BACKENDS: dict[str, QuantBackend] = {}
for _b in BACKEND_ROWS:
    BACKENDS.setdefault(_b.dtype, _b)
PACKAGES = tuple(dict.fromkeys(b.package for b in BACKEND_ROWS))


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def backend_for(dtype: str | DType, device_types: set[str], prefer: str | None = None) -> QuantBackend:
    """The backend that quantizes ``dtype`` on load, checked installed and able to run on every
    device type in ``device_types``; one line (WorkloadError, exit 2) otherwise. ``prefer``: a
    package (``"torchao"``, ``"bitsandbytes"``); else the dtype's first installed row."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    rows = [b for b in BACKEND_ROWS if b.dtype == dt.name]
    if not rows:
        known = ", ".join(BACKENDS)
        raise WorkloadError(f"--dtype {dt.name} cannot be quantized on load of a float checkpoint "
                            f"(on-load quantization: {known}; GGUF files load their own {dt.name} blocks)")
    if prefer is not None:
        if prefer not in PACKAGES:
            raise WorkloadError(f"quantization backend {prefer!r}: known {', '.join(PACKAGES)}")
        chosen = [b for b in rows if b.package == prefer]
        if not chosen:
            raise WorkloadError(f"--dtype {dt.name} is not quantized through {prefer} "
                                f"(it is through {', '.join(b.package for b in rows)})")
        rows = chosen
    b = next((b for b in rows if _installed(b.package)), None)
    if b is None:
        needed = " or ".join(r.package for r in rows)
        raise WorkloadError(f"--dtype {dt.name} needs the {needed} package: pip install 'vramancer[quant]'")
    missing = sorted(device_types - set(b.devices))
    if missing:
        raise WorkloadError(f"--dtype {dt.name}: {b.package} has no kernel for {', '.join(missing)} devices "
                            f"(it runs on {', '.join(b.devices)})")
    return b


def prepare_model(model: nn.Module, backend: QuantBackend, compute: torch.dtype) -> list[str]:
    """Swap every ``nn.Linear`` of the meta-built ``model`` but its LM head for ``backend``'s layer
    (torchao keeps the layer, its weight is replaced on load); returns the names of the weights to
    quantize on load."""
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
        # biases stay float, at the compute dtype (bitsandbytes' layers make them fp32)
        if layer.bias is not None and layer.bias.dtype != compute:
            layer.bias = nn.Parameter(torch.empty_like(layer.bias, dtype=compute, device="meta"),
                                      requires_grad=False)
        setattr(parent, child_name, layer)
    return names


def quantized_param_bytes(p: torch.Tensor) -> int:
    """Bytes a weight holds: its own storage plus, for bitsandbytes weights, the scales and code
    table it carries (Params4bit.quant_state: absmax + code; Int8Params.SCB); for a torchao tensor
    subclass, the sum of its inner tensors (``qdata`` + ``scale`` + those set of the optional ones)."""
    names = getattr(p, "tensor_data_names", None)
    if names is not None:
        inner = list(names) + list(getattr(p, "optional_tensor_data_names", None) or ())
        return sum(t.numel() * t.element_size() for t in (getattr(p, k, None) for k in inner) if t is not None)
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
