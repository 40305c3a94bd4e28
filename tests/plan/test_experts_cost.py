"""The cost model's price of MoE experts on the host (plan/cost.py): an experts module run alone pays
its top-k experts' bytes and its own fixed cost (a fraction of a layer's, growing with k), not a
whole layer's; a whole MoE layer run on the host pays more than a dense one by the experts module's fixed cost in a
decode step (the same host path) and, in a prefill, transformers' experts path's, growing with the
routed experts; the planner's experts plan adds exactly that."""
from __future__ import annotations

from dataclasses import replace

import pytest

from vramancer.devices.host_speed import HostSpeed
from vramancer.devices.spec import parse_devices
from vramancer.models.resolve import profile
from vramancer.plan import cost as C
from vramancer.plan.cost import CostModel

HOST = HostSpeed(bandwidth_bytes_per_s=10e9, gemm_flops_per_s=100e9, block_overhead_s=0.4e-3, step_overhead_s=1e-4,
                 decode_parallel_op_s=0.0, threads=1)


@pytest.fixture(scope="module")
def mixtral():
    return profile("mixtral-8x7b", dtype="q8_0")


def test_experts_module_alone(mixtral):
    cpu = parse_devices("cpu:64GiB")[0]
    cost = CostModel(mixtral, 1024, 1, 512, host=HOST)
    assert cost.experts_per_token() == 2 and cost.routed_experts() == 8
    b = next(b for b in mixtral.blocks if b.experts_bytes)
    read = b.experts_read_bytes_per_token / cpu.bandwidth_bytes_per_s
    flops = b.experts_flops_per_token / (cpu.tflops * 1e12)
    want = max(read, flops) + HOST.block_overhead_s * (C.EXPERTS_OVERHEAD_FIXED + 2 * C.EXPERTS_OVERHEAD_PER_EXPERT)
    assert cost.experts_decode_seconds(b, cpu) == pytest.approx(want, rel=1e-12)
    assert C.EXPERTS_OVERHEAD_FIXED + 2 * C.EXPERTS_OVERHEAD_PER_EXPERT < 1   # less than a whole layer's
    # a batch reads at most every expert once
    many = CostModel(mixtral, 1024, 64, 512, host=HOST)
    assert many.experts_decode_seconds(b, cpu) >= b.experts_bytes / cpu.bandwidth_bytes_per_s


def test_whole_moe_layer_on_the_host_pays_the_experts_path(mixtral):
    cpu = parse_devices("cpu:64GiB")[0]
    cost = CostModel(mixtral, 1024, 1, 512, host=HOST)
    b = next(b for b in mixtral.blocks if b.experts_bytes)
    dense = replace(b, experts_bytes=0, experts_read_bytes_per_token=0, experts_flops_per_token=0.0, experts_module="")
    (decode, prefill), (dense_decode, dense_prefill) = cost.execute_seconds(b, cpu), cost.execute_seconds(dense, cpu)
    k, e = 2, 8
    module = C.EXPERTS_OVERHEAD_FIXED + k * C.EXPERTS_OVERHEAD_PER_EXPERT
    # decode: runtime/experts.py's host path over the selected experts; prefill: transformers' loop over all
    assert decode - dense_decode == pytest.approx(HOST.block_overhead_s * module, rel=1e-9)
    loop = module + e * C.EXPERTS_OVERHEAD_PER_ROUTED
    assert prefill - dense_prefill == pytest.approx(HOST.block_overhead_s * loop, rel=1e-9)
    gpu = parse_devices("rtx3090")[0]
    assert cost.execute_seconds(b, gpu) == cost.execute_seconds(dense, gpu)   # GPUs: no such loop priced


def test_decode_thread_hand_offs_of_the_expert_matmuls(mixtral):
    """With threads handing off: an experts module alone pays one per expert matmul (2 x k); a whole MoE
    layer those too, in place of the dense gate, up and down (2 x k - 2 more than a dense layer)."""
    cpu = parse_devices("cpu:64GiB")[0]
    busy = replace(HOST, decode_parallel_op_s=0.2e-3, threads=2)
    b = next(b for b in mixtral.blocks if b.experts_bytes)
    dense = replace(b, experts_bytes=0, experts_read_bytes_per_token=0, experts_flops_per_token=0.0, experts_module="")
    quiet, loud = CostModel(mixtral, 1024, 1, 512, host=HOST), CostModel(mixtral, 1024, 1, 512, host=busy)
    assert loud.experts_decode_seconds(b, cpu) - quiet.experts_decode_seconds(b, cpu) == pytest.approx(4 * 0.2e-3)
    layer = (loud.execute_seconds(b, cpu)[0] - loud.execute_seconds(dense, cpu)[0]
             - (quiet.execute_seconds(b, cpu)[0] - quiet.execute_seconds(dense, cpu)[0]))
    assert layer == pytest.approx((2 * 2 - 2) * 0.2e-3)
