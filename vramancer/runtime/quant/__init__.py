"""Quantized weights in the split runtime: float checkpoints quantized on load (``backends.py``:
NF4 / FP4 (int4) / int8 through bitsandbytes, int8 through torchao; one table row per dtype and
package) and pre-quantized bitsandbytes checkpoints loaded as stored (``prequantized.py``; GPTQ /
AWQ refused in one line naming the package or device they need)."""
from __future__ import annotations

from .backends import BACKENDS, QuantBackend, backend_for, prepare_model, quantized_param_bytes

__all__ = ["BACKENDS", "QuantBackend", "backend_for", "prepare_model", "quantized_param_bytes"]
