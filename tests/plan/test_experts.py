"""MoE routed experts in host RAM (plan/experts.py): exact experts bytes in the profile, the
planner choosing them over whole-layer offload for a catalog Mixtral, the plan's JSON, its
llama.cpp export, and the runtime's layout of them (tests/runtime/test_moe_experts.py runs them)."""
from __future__ import annotations

import pytest

from vramancer.errors import BadInputError
from vramancer.models.arch import profile_from_config
from vramancer.plan.plan import Plan
from vramancer.plan.planner import plan

DEVICES = "rtx3090,rtx3060,cpu:64GiB"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_bytes_equal_the_model_modules(arch):
    from tests.models.tiny import config, config_dict, meta_model

    cfg = config(arch)
    prof = profile_from_config(config_dict(cfg), "float32")
    model = meta_model(cfg)
    moe_layers = 0
    for b in prof.blocks:
        if not b.experts_module:
            assert b.experts_bytes == 0
            continue
        moe_layers += 1
        mod = model.get_submodule(b.experts_module)
        assert b.experts_bytes == sum(p.numel() * p.element_size() for p in mod.parameters())
        assert 0 < b.experts_read_bytes_per_token < b.experts_bytes
        assert b.experts_bytes < b.weights_bytes
    # qwen2_moe with decoder_sparse_step=2: only every second layer is sparse
    assert moe_layers == (cfg.num_hidden_layers if arch == "mixtral" else cfg.num_hidden_layers // 2)


def test_planner_keeps_mixtral_experts_in_host_ram():
    whole = plan("mixtral-8x7b", devices=DEVICES, dtype="q8_0", moe_experts_on_host=False)
    moe = plan("mixtral-8x7b", devices=DEVICES, dtype="q8_0")
    assert whole.offloaded and not moe.offloaded            # every block's non-expert part on the GPUs
    moved = [b for b in moe.blocks if b.experts_device is not None]
    assert moved and all(b.experts_device == "cpu" for b in moved)
    assert [b.layer_index for b in moved] == list(range(len(moved)))   # the first N layers
    assert moe.predicted.decode_tokens_per_s > whole.predicted.decode_tokens_per_s
    # prefill: both copy host-RAM weights to a GPU (whole layers run per phase, plan/phase.py); the request
    # is served sooner with the experts in host RAM
    from vramancer.plan.planner import request_seconds

    assert request_seconds(moe) < request_seconds(whole)
    assert all(s.mode == "phase" for s in whole.offloaded)
    # room for the prefill copy of one layer's experts on each GPU holding moved experts, within its memory
    assert all(s.total_bytes <= s.capacity_bytes for s in moe.stages)
    one = max(b.experts_bytes for b in moved)
    assert moe.stages[moe.block_stage_indices()[moe.blocks.index(moved[0])]].activation_bytes >= one
    assert moe.device_used_bytes()["cpu"] == sum(b.experts_bytes for b in moved)
    assert not moe.device_shortfalls()
    assert f"--n-cpu-moe {len(moved)}" in moe.exports["llama_cpp"]
    assert moe.exports["llama_cpp_ot"].startswith('-ot "blk\\.(0|1|')
    assert "vllm_pp_layer_partition" not in moe.exports
    # fewest layers: one layer fewer does not fit on the GPUs
    from vramancer.devices.spec import parse_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.experts import _try, experts_blocks
    from vramancer.plan.plan import Workload

    prof = profile("mixtral-8x7b", dtype="q8_0")
    devs = parse_devices(DEVICES)
    host = next(i for i, d in enumerate(devs) if d.kind == "cpu")
    cand = experts_blocks(prof)
    assert _try(prof, devs, moe.workload, None, cand[:len(moved) - 1], host, _plan_profile()) is None
    assert isinstance(moe.workload, Workload)
    again = Plan.from_json(moe.to_json())
    assert [b.experts_bytes for b in again.blocks] == [b.experts_bytes for b in moe.blocks]
    assert again.device_used_bytes() == moe.device_used_bytes()


def _plan_profile():
    from vramancer.plan.planner import plan_profile

    return plan_profile


def test_dense_model_and_gpu_fit_unchanged():
    p = plan("mixtral-8x7b", devices=DEVICES, dtype="q4_k_m")   # fits on the GPUs: nothing moves
    assert not any(b.experts_device for b in p.blocks)
    d = plan("llama-3.1-8b", devices="rtx3060,cpu:64GiB", dtype="bfloat16")
    assert not any(b.experts_device for b in d.blocks)


def test_bad_experts_device_refused():
    d = plan("mixtral-8x7b", devices=DEVICES, dtype="q8_0").to_dict()
    i = next(j for j, b in enumerate(d["blocks"]) if b.get("experts_device"))
    d["blocks"][i]["experts_device"] = "rtx3090#0"
    with pytest.raises(BadInputError, match="experts_device"):
        Plan.from_dict(d)


def test_runtime_layout_maps_experts_to_the_host():
    """The runtime's layout puts every tensor of a moved experts module on the plan's host device, and
    nothing else; a plan whose experts module the model lacks is refused in one line."""
    from tests.models.tiny import config, config_dict, meta_model
    from vramancer.devices.spec import parse_devices
    from vramancer.models.arch import profile_from_config
    from vramancer.plan.experts import experts_on_host
    from vramancer.plan.plan import Workload
    from vramancer.plan.planner import plan_profile
    from vramancer.runtime.layout import layout_from_plan, stage_layout

    cfg = config("mixtral", num_hidden_layers=4)
    prof = profile_from_config(config_dict(cfg), "float32")
    devs = parse_devices("rtx3090:400KiB,rtx3060:300KiB,cpu:8GiB")
    w = Workload(context=64, batch=1, dtype="float32")
    whole = plan_profile(prof, devs, w, reserve_bytes=0, moe_experts_on_host=False)
    p = experts_on_host(prof, devs, w, 0, whole, plan_profile)
    assert p is not None
    model = meta_model(cfg)
    lay = stage_layout(model, layout_from_plan(p, model), p)
    moved = [b for b in p.blocks if b.experts_device]
    want = {n for n, _ in model.named_parameters() for b in moved if n.startswith(b.experts_module + ".")}
    assert want and set(lay.tensor_host) == want and set(lay.tensor_host.values()) == {"cpu"}
    d = p.to_dict()
    i = next(j for j, b in enumerate(d["blocks"]) if b.get("experts_device"))
    d["blocks"][i]["modules"] = ["model.embed_tokens"]
    d["blocks"][i]["experts_module"] = "model.layers.9.mlp.experts"
    with pytest.raises(BadInputError, match="no such module"):
        layout_from_plan(Plan.from_dict(d), model)


def test_plan_json_and_table_show_an_experts_entry():
    from rich.console import Console

    from vramancer.plan.commands import render_plan

    p = plan("mixtral-8x7b", devices=DEVICES, dtype="q8_0")
    moved = [i for i, b in enumerate(p.blocks) if b.experts_device]
    assert moved == list(range(moved[0], moved[-1] + 1))
    stages = sorted({p.block_stage_indices()[i] for i in moved})
    assert p.to_dict()["experts"] == [{"kind": "experts", "device": "cpu", "blocks": [moved[0], moved[-1] + 1],
                                       "compute_device": "cpu", "stages": stages,
                                       "weights_bytes": sum(p.blocks[i].experts_bytes for i in moved)}]
    assert Plan.from_json(p.to_json()).to_dict() == p.to_dict()   # derived, read back the same
    assert "experts" not in plan("llama-3.1-8b", devices="rtx3060,cpu:64GiB").to_dict()
    con = Console(record=True, width=200)
    render_plan(p, con)
    row = next(line for line in con.export_text().splitlines() if line.startswith("x "))
    assert row.split()[1:4] == ["cpu", "experts", f"L{moved[0] - 1}-{moved[-1] - 1}"]
