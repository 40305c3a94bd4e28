"""The KV cache stored in another format than the compute dtype (``--kv-dtype``, like llama.cpp's
``-ctk/-ctv``): a transformers ``DynamicCache`` whose layers keep keys and values packed and hand
the attention dequantized copies.

Formats (``KVFormat``), per value along the head dimension:
  * ``q8_0``: llama.cpp's Q8_0 block: 32 int8 values and one fp16 scale ``d = max|x| / 127``,
    values ``round(x / d)`` (34 bytes per 32 values); read back as ``q * d``;
  * ``fp8``: ``float8_e4m3fn``, saturated to +-448 (one byte a value);
  * ``bfloat16`` / ``float16`` / ``float32``: a plain cast.

A layer keeps ``keys`` / ``values`` as the packed data (int8, float8 or float; shape
``[batch, kv_heads, tokens, head_dim]``, so the cache's length, batch and device read as usual) and
``key_scales`` / ``value_scales`` (q8_0 only, ``[batch, kv_heads, tokens, head_dim / 32]`` fp16).
New tokens are packed once, when they arrive; each forward reads the whole layer back at the
compute dtype (the attention needs it), one layer at a time, so besides the packed cache a device
holds one layer's dequantized keys and values while that layer runs. Sliding-window layers keep
their last ``window - 1`` tokens, as transformers' own. ``runtime/memory.py`` counts the packed
data and the scales: what the planner budgets (``DType.cache_bytes``).

    cache = new_kv_cache(model.config, "q8_0")
    model.generate(..., past_key_values=cache)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import WorkloadError
from ..models.dtypes import Q8_0_BLOCK, resolve_kv_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["KVFormat", "kv_format", "new_kv_cache", "kv_cache_for", "quantize_q8_0", "dequantize_q8_0",
           "check_head_dim", "FP8_MAX", "layer_tensors", "cache_with_tensors"]

FP8_MAX = 448.0   # largest finite float8_e4m3fn


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (last dim a multiple of 32) as Q8_0 blocks: (int8 values of x's shape, fp16 scales of
    shape ``[..., last / 32]``), computed as llama.cpp's ``quantize_row_q8_0_ref`` does (in fp32:
    ``d = amax / 127``, ``q = round(x / d)`` with the unrounded ``d``, ``d`` stored as fp16)."""
    import torch

    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv).clamp_(-127, 127).to(torch.int8)
    return q.reshape(shape), d.squeeze(-1).to(torch.float16)


def dequantize_q8_0(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q8_0 blocks back to ``dtype``: each value ``q * d`` (in fp32, as llama.cpp dequantizes)."""
    shape = q.shape
    blocks = q.reshape(*shape[:-1], shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK).float()
    return (blocks * d.float().unsqueeze(-1)).reshape(shape).to(dtype)


@dataclass(frozen=True)
class KVFormat:
    """How cached keys and values are stored: ``name`` (a ``KV_DTYPES`` name), ``torch_name`` of
    the stored data, whether it carries Q8_0 ``scales``."""

    name: str
    torch_name: str
    scales: bool = False

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        if self.scales:
            return quantize_q8_0(x)
        dt = getattr(torch, self.torch_name)
        if self.name == "fp8":
            return x.clamp(-FP8_MAX, FP8_MAX).to(dt), None
        return x.to(dt), None

    def decode(self, data: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if self.scales:
            return dequantize_q8_0(data, scales, dtype)
        return data.to(dtype)


_FORMATS = {
    "q8_0": KVFormat("q8_0", "int8", scales=True),
    "fp8": KVFormat("fp8", "float8_e4m3fn"),
    "bfloat16": KVFormat("bfloat16", "bfloat16"),
    "float16": KVFormat("float16", "float16"),
    "float32": KVFormat("float32", "float32"),
}


def kv_format(name: str) -> KVFormat:
    """The format of ``--kv-dtype name``; one line (WorkloadError, exit 2) for an unknown one."""
    return _FORMATS[resolve_kv_dtype(name).name]


def _head_dim(config: Any) -> int | None:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hd = getattr(cfg, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def check_head_dim(config: Any, fmt: KVFormat) -> None:
    """A q8_0 cache stores whole blocks of 32 values per head: refuse (one line) other head sizes."""
    hd = _head_dim(config) if config is not None else None
    if fmt.scales and hd is not None and hd % Q8_0_BLOCK:
        raise WorkloadError(f"--kv-dtype q8_0 stores blocks of {Q8_0_BLOCK} values per head; this model's head "
                            f"size is {hd} (use --kv-dtype fp8 or bf16)")


def _layer_classes() -> tuple[type, type]:
    """(full-attention layer, sliding-window layer) classes, built once transformers is imported."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import torch
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    class _Packed:
        """Packed storage shared by both layer kinds (mixed in before the transformers class)."""

        fmt: KVFormat
        key_scales: torch.Tensor | None
        value_scales: torch.Tensor | None

        def _init_packed(self, fmt: KVFormat) -> None:
            self.fmt = fmt
            self.key_scales = self.value_scales = None
            self.compute_dtype: torch.dtype | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            if self.fmt.scales and key_states.shape[-1] % Q8_0_BLOCK:
                raise WorkloadError(f"--kv-dtype q8_0 stores blocks of {Q8_0_BLOCK} values per head; this "
                                    f"model's head size is {key_states.shape[-1]}")
            self.device = key_states.device
            self.compute_dtype = key_states.dtype
            k, ks = self.fmt.encode(key_states[..., :0, :])
            v, vs = self.fmt.encode(value_states[..., :0, :])
            self.keys, self.values, self.key_scales, self.value_scales = k, v, ks, vs
            self.is_initialized = True

        def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            k, ks = self.fmt.encode(key_states)
            v, vs = self.fmt.encode(value_states)
            self.keys = torch.cat([self.keys, k], dim=-2)
            self.values = torch.cat([self.values, v], dim=-2)
            if ks is not None:
                self.key_scales = torch.cat([self.key_scales, ks], dim=-2)
                self.value_scales = torch.cat([self.value_scales, vs], dim=-2)

        def _keep(self, index: Any) -> None:
            """Apply ``index`` (a slice along tokens, or a batch selection) to data and scales alike."""
            self.keys, self.values = self.keys[index], self.values[index]
            if self.key_scales is not None:
                self.key_scales, self.value_scales = self.key_scales[index], self.value_scales[index]

        def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
            dt = self.compute_dtype
            return (self.fmt.decode(self.keys, self.key_scales, dt),
                    self.fmt.decode(self.values, self.value_scales, dt))

        def reset(self) -> None:
            self.key_scales = self.value_scales = None
            super().reset()  # type: ignore[misc]

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length() > 0:  # type: ignore[attr-defined]
                self.keys = self.keys.repeat_interleave(repeats, dim=0)
                self.values = self.values.repeat_interleave(repeats, dim=0)
                if self.key_scales is not None:
                    self.key_scales = self.key_scales.repeat_interleave(repeats, dim=0)
                    self.value_scales = self.value_scales.repeat_interleave(repeats, dim=0)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.get_seq_length() > 0:  # type: ignore[attr-defined]
                self._keep((indices, Ellipsis))

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.get_seq_length() > 0:  # type: ignore[attr-defined]
                self._keep((beam_idx.to(self.keys.device), Ellipsis))

        def offload(self) -> None:
            if self.is_initialized:  # type: ignore[attr-defined]
                self._move("cpu")

        def prefetch(self) -> None:
            if self.is_initialized and self.keys.device != self.device:  # type: ignore[attr-defined]
                self._move(self.device)

        def _move(self, device: Any) -> None:
            self.keys = self.keys.to(device, non_blocking=True)
            self.values = self.values.to(device, non_blocking=True)
            if self.key_scales is not None:
                self.key_scales = self.key_scales.to(device, non_blocking=True)
                self.value_scales = self.value_scales.to(device, non_blocking=True)

    class PackedKVLayer(_Packed, DynamicLayer):
        """A full-attention layer: every token kept, packed."""

        def __init__(self, fmt: KVFormat, **kwargs: Any):
            DynamicLayer.__init__(self)
            self._init_packed(fmt)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._append(key_states, value_states)
            return self._read()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative count of tokens to remove")
            if tokens_to_remove and self.is_initialized:
                self._keep((Ellipsis, slice(None, tokens_to_remove), slice(None)))

    class PackedKVSlidingLayer(_Packed, DynamicSlidingWindowLayer):
        """A sliding-window layer: the last ``window - 1`` tokens kept, packed; the forward sees
        those and the new ones (transformers' ``DynamicSlidingWindowLayer``, without its
        past-recording mode for assisted decoding)."""

        def __init__(self, fmt: KVFormat, sliding_window: int, **kwargs: Any):
            DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
            self._init_packed(fmt)

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            _Packed.lazy_initialization(self, key_states, value_states)
            self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            self._append(key_states, value_states)
            full_k, full_v = self._read()
            keep = self.sliding_window - 1
            if self.keys.shape[-2] > keep:
                self._keep((Ellipsis, slice(self.keys.shape[-2] - keep, None), slice(None)))
            return full_k, full_v

        def activate_past_recording(self) -> None:
            raise WorkloadError("--kv-dtype caches do not record past sliding-window states (assisted decoding)")

        def crop(self, tokens_to_remove: int) -> None:
            if self.get_seq_length() >= self.sliding_window:
                raise RuntimeError("a sliding-window layer past its window cannot be cropped")
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative count of tokens to remove")
            if tokens_to_remove and self.is_initialized:
                self._keep((Ellipsis, slice(None, tokens_to_remove), slice(None)))
                self.cumulative_length = self.keys.shape[-2]

    _CLASSES = (PackedKVLayer, PackedKVSlidingLayer)
    return _CLASSES


_CLASSES: tuple[type, type] | None = None


def new_kv_cache(config: Any, kv_dtype: str) -> Any:
    """An empty transformers ``DynamicCache`` for a model of ``config`` whose attention layers store
    their keys and values as ``kv_dtype`` (sliding-window layers stay sliding; other layer kinds,
    such as linear attention, are transformers' own)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    fmt = kv_format(kv_dtype)
    check_head_dim(config, fmt)
    full, sliding = _layer_classes()
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if cache.layers:
        layers = []
        for layer in cache.layers:
            if type(layer) is DynamicSlidingWindowLayer:
                layers.append(sliding(fmt, sliding_window=layer.sliding_window))
            elif type(layer) is DynamicLayer:
                layers.append(full(fmt))
            else:
                layers.append(layer)
        cache.layers = layers
    else:   # layers made as the forward reaches them
        cache.layer_class_to_replicate = lambda: full(fmt)
    return cache


def kv_cache_for(model: Any) -> Any:
    """The cache ``model``'s runtime keeps (``SplitRuntime.kv_dtype``: the plan's ``--kv-dtype``, or
    a GGUF model's float16 cache), or None: transformers' default (the compute dtype) for a model
    that is not split or keeps its cache in the compute dtype."""
    kv = getattr(getattr(model, "vramancer", None), "kv_dtype", None)
    if kv is None:
        return None
    return new_kv_cache(getattr(model, "config", None), kv)


def layer_tensors(layer: Any) -> tuple[Any, ...]:
    """A cache layer's stored tensors, batch first and tokens at dim -2: (keys, values) and, for a
    q8_0 layer, its (key_scales, value_scales); Nones for a layer never written."""
    parts = (getattr(layer, "keys", None), getattr(layer, "values", None))
    if getattr(layer, "key_scales", None) is not None:
        parts += (layer.key_scales, layer.value_scales)
    return parts


def cache_with_tensors(template: Any, layers: Any) -> Any:
    """A cache of ``template``'s kind holding ``layers`` (an iterable of ``layer_tensors`` tuples,
    consumed one layer at a time): a packed cache (``new_kv_cache``) in the template's format and
    compute dtype, else transformers' ``DynamicCache`` of (keys, values)."""
    from transformers import DynamicCache

    packed = [la for la in getattr(template, "layers", []) if hasattr(la, "fmt")]
    if not packed:
        return DynamicCache(ddp_cache_data=((t[0], t[1]) for t in layers))
    fmt = packed[0].fmt
    compute = next((la.compute_dtype for la in packed if la.compute_dtype is not None), None)
    full, _ = _layer_classes()
    cache = new_kv_cache(None, fmt.name)
    out = []
    for parts in layers:
        layer = full(fmt)
        if parts[0] is not None:
            layer.keys, layer.values = parts[0], parts[1]
            if fmt.scales:
                layer.key_scales, layer.value_scales = parts[2], parts[3]
            layer.device, layer.compute_dtype, layer.is_initialized = parts[0].device, compute, True
        out.append(layer)
    cache.layers = out
    return cache
