"""Quantize on load: float checkpoints loaded as NF4 / int8 weights, tensor by tensor, through
bitsandbytes (``backends.py``: one table row per dtype)."""
from __future__ import annotations

from .backends import BACKENDS, QuantBackend, backend_for, prepare_model, quantized_param_bytes

__all__ = ["BACKENDS", "QuantBackend", "backend_for", "prepare_model", "quantized_param_bytes"]
