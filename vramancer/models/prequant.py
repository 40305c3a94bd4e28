"""Pre-quantized checkpoints: the bytes their weights hold once loaded, from the stored tensors.

A bitsandbytes checkpoint saved by transformers stores, beside each quantized weight, tensors that
loading parses and drops: ``X.weight.quant_state.bitsandbytes__nf4|fp4`` (a JSON blob of the
blocksize, shape, dtype and the double-quantization offset) and ``X.weight_format`` (an 8-bit
legacy marker). The loaded 4-bit weight holds its packed data, ``absmax`` and ``quant_map`` (with
double quantization also ``nested_absmax``, ``nested_quant_map`` and the offset, one fp32); the
8-bit one its int8 data and ``SCB``. ``held_tensors`` turns a checkpoint's tensor list into what
loading keeps (runtime/quant/prequantized.py loads exactly these), so plans count the held bytes.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

__all__ = ["held_tensors"]

_BLOB = re.compile(r"\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_OFFSET_BYTES = 4   # QuantState.offset: one fp32 scalar, parsed from the blob of a double-quantized weight


def held_tensors(tensors: list[Any], config: dict | None) -> list[Any]:
    """``tensors`` (checkpoint header entries with ``name`` / ``nbytes``) as a bitsandbytes
    checkpoint holds them loaded; unchanged for any other checkpoint."""
    q = (config or {}).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "bitsandbytes":
        return tensors
    out = []
    for t in tensors:
        if _BLOB.search(t.name) or t.name.endswith(".weight_format"):
            continue
        if t.name.endswith(".weight.nested_absmax"):
            t = replace(t, nbytes=t.nbytes + _OFFSET_BYTES)
        out.append(t)
    return out
