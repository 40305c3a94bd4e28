"""The planner runs offloaded layers where each phase is fastest (plan/phase.py): it chooses among
executing them in host RAM, streaming them through a GPU, and "phase" (decode on the host, prefill
streamed) by the representative request's time, even when the stream buffer pushes a few more
blocks off the GPUs."""
from __future__ import annotations

from dataclasses import replace

from vramancer.devices.spec import parse_devices
from vramancer.models.resolve import profile
from vramancer.plan.plan import Plan, Workload
from vramancer.plan.planner import plan, plan_placement, plan_profile, request_seconds

DEVICES = "rtx3090,rtx3060,cpu:64GiB"


def _executed(p: Plan, prof, devs) -> Plan:
    """The same placement with its offloaded stages executed in host RAM."""
    return plan_placement(prof, devs, p.workload, [b.device for b in p.blocks], offload_mode="execute")


def test_issue_example_no_longer_executes_with_a_note():
    """`vramancer plan llama-3.1-70b --devices rtx3090,rtx3060,cpu:64GiB --context 16384 --dtype q4_k_m`
    kept execute mode (2 tokens/s prefill) with a note that streaming would be 18x sooner."""
    p = plan("llama-3.1-70b", devices=DEVICES, context=16384, dtype="q4_k_m")
    assert p.offloaded and all(s.mode != "execute" for s in p.offloaded)
    assert not any("would serve a request" in n for n in p.notes)
    prof, devs = profile("llama-3.1-70b", dtype="q4_k_m"), parse_devices(DEVICES)
    ex = _executed(p, prof, devs)
    assert request_seconds(p) < request_seconds(ex) / 10
    assert p.predicted.prefill_tokens_per_s > 50 * ex.predicted.prefill_tokens_per_s
    assert any("sooner than executing them" in n for n in p.notes)


def test_fast_host_decodes_there_and_prefills_on_the_gpu():
    prof = profile("llama-3.1-70b", dtype="q4_k_m")
    devs = [replace(d, bandwidth_bytes_per_s=100e9, tflops=1.0) if d.kind == "cpu" else d
            for d in parse_devices(DEVICES)]
    w = Workload(context=16384, batch=1, dtype=prof.dtype)
    p = plan_profile(prof, devs, w)
    (off,) = p.offloaded
    assert off.mode == "phase" and off.compute_device == "rtx3090#0"
    assert [b.stages for b in p.stream_buffers] == [(p.stages.index(off),)]
    blocks = [b.device for b in p.blocks]
    streamed = plan_placement(prof, devs, w, blocks, offload_mode="stream")
    executed = plan_placement(prof, devs, w, blocks, offload_mode="execute")
    # decode as fast as on the host, prefill as fast as streamed: sooner than either alone
    assert off.decode_seconds == executed.stages[p.stages.index(off)].decode_seconds
    assert off.prefill_seconds == streamed.stages[p.stages.index(off)].prefill_seconds
    assert p.predicted.prefill_tokens_per_s == streamed.predicted.prefill_tokens_per_s
    assert p.predicted.decode_tokens_per_s > streamed.predicted.decode_tokens_per_s
    assert request_seconds(p) < min(request_seconds(streamed), request_seconds(executed))
    assert any("run per phase: decode on cpu" in n for n in p.notes)
    again = Plan.from_json(p.to_json())
    assert again.offloaded[0].mode == "phase" and again.to_dict() == p.to_dict()


def test_chosen_plan_never_serves_a_request_slower_than_executing():
    p = plan("llama-3.1-8b", devices="rtx3060,cpu:64GiB", dtype="bfloat16", context=2048)
    assert p.offloaded
    prof, devs = profile("llama-3.1-8b", dtype="bfloat16"), parse_devices("rtx3060,cpu:64GiB")
    assert request_seconds(p) <= request_seconds(_executed(p, prof, devs)) + 1e-9
