"""Weights quantized on load (nf4 / int4 / int8) stay resident: the planner never streams them or
runs them per phase (the runtime would refuse such a plan), while float weights may stream."""
from __future__ import annotations

import pytest

from vramancer.plan.planner import plan

DEVICES = "rtx3090,rtx3060,cpu:64GiB"


@pytest.mark.parametrize("dtype", ["nf4", "int4", "int8"])
def test_on_load_quantized_offload_executes(dtype):
    p = plan("llama-3.1-70b", devices=DEVICES, dtype=dtype, context=4096)
    assert p.offloaded and all(s.mode == "execute" for s in p.stages)
    assert not p.stream_buffers
    assert any("stay where they are loaded" in n for n in p.notes)


def test_float_offload_may_stream():
    p = plan("llama-3.1-70b", devices=DEVICES, dtype="q4_k_m", context=16384)
    assert p.offloaded and any(s.mode in ("stream", "phase") for s in p.stages)
    assert not any("stay where they are loaded" in n for n in p.notes)
