"""Smoke test of benchmarks/planner_vs_accelerate.py: its device-map reading and memory judging on
exact byte counts, and one case end to end in-process (a benchmark prints; it is not asserted on speed)."""
from __future__ import annotations

import pytest

from tests.benchmarks.conftest import import_script
from vramancer.devices.spec import parse_devices
from vramancer.models.resolve import profile as make_profile
from vramancer.plan.plan import Workload
from vramancer.plan.planner import plan_placement


@pytest.fixture(scope="module")
def bench():
    yield from import_script("planner_vs_accelerate", "planner_vs_accelerate")


def test_device_map_to_blocks_by_largest_share(bench):
    prof = make_profile("llama-3.2-1b", dtype="bfloat16")          # 16 layers: blocks 0..17, tied head
    n = prof.num_blocks
    params = [("model.embed_tokens.weight", 1000), ("model.rotary_emb.inv_freq", 0)]
    for i in range(16):
        params += [(f"model.layers.{i}.self_attn.q_proj.weight", 40), (f"model.layers.{i}.mlp.up_proj.weight", 60)]
    params += [("model.norm.weight", 2), ("lm_head.weight", 1000)]
    table = bench._block_index_table(prof)
    blocks = [bench._prefix_lookup(name, table) for name, _ in params]
    dmap = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 for i in range(7)},
            "model.layers.7.self_attn": 0, "model.layers.7.mlp": 1,
            **{f"model.layers.{i}": 1 for i in range(8, 16)}, "model.norm": 1, "lm_head": "cpu"}
    keys = {0: "g0", 1: "g1", "cpu": "cpu"}
    out, split, unplaced = bench.block_devices_from_device_map(n, params, blocks, dmap, keys)
    # layer 7 (block 8) is split 40 bytes on g0 / 60 on g1: it goes to g1; the head block's
    # lm_head (1000 bytes on cpu) outweighs model.norm (2 bytes on g1)
    assert out == ["g0"] * 8 + ["g1"] * 9 + ["cpu"]
    assert split == [8, 17]
    assert unplaced == 0
    # a map that places nothing under "lm_head" leaves its bytes unplaced
    del dmap["lm_head"]
    _, _, unplaced = bench.block_devices_from_device_map(n, params, blocks, dmap, keys)
    assert unplaced == 1000


def test_revisited_device_counts_reserve_and_tied_weights_once(bench):
    prof = make_profile("llama-3.2-1b", dtype="bfloat16")
    devices = parse_devices("rtx3060,rtx3060,cpu:64GiB")
    g0, g1 = devices[0].id, devices[1].id
    n = prof.num_blocks
    placement = [g0] * 6 + [g1] * (n - 7) + [g0]          # the tied LM head back beside the embeddings
    workload = Workload(context=4096, dtype="bfloat16")
    p = plan_placement(prof, devices, workload, placement)
    assert [s.device for s in p.stages] == [g0, g1, g0]
    over = bench.device_overflow(p, prof)
    first, last = p.stages[0], p.stages[2]
    own = sum(prof.blocks[b].weights_bytes for b in list(range(0, 6)) + [n - 1])
    tied = {k: v for b in (0, n - 1) for k, v in prof.blocks[b].shared.items()}
    assert sum(tied.values()) > 0
    kv = sum(prof.blocks[b].kv_bytes(4096, 1) for b in list(range(0, 6)) + [n - 1])
    from vramancer.plan.memory import BlockTable

    t = BlockTable(prof, 4096, 1, 512)
    act = max(t.range_memory(0, 6).activation_bytes, t.range_memory(n - 1, n).activation_bytes)
    assert last.reserve_bytes == 0  # the device's reserve is counted once, on its first stage
    expected = own + sum(tied.values()) + kv + act + first.reserve_bytes
    assert over[g0] == expected - devices[0].free_bytes
    assert over[g1] == p.stages[1].total_bytes - devices[1].free_bytes


def test_one_case_end_to_end(bench, capsys):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    case = bench.Case("llama-3.2-1b", "bfloat16", "rtx3060,rtx4060,cpu:64GiB", 4096)
    (res,) = bench.run_cases([case], repeat=1)
    ours = res.results["ours"]
    assert ours.ok and ours.fits and ours.offloaded_blocks == 0
    for tool in ("acc-seq", "acc-bal"):
        acc = res.results[tool]
        assert acc.ok, acc.note
        covered = []
        for st in acc.stages:
            a, b = st.split("[", 1)[1].split("]", 1)[0].split(":")
            covered += list(range(int(a), int(b)))
        assert covered == list(range(18))
        never_worse, _, why = bench.compare(ours, acc)
        assert never_worse, why
    lines, goals = bench.summarize([res])
    assert any(line.startswith("vs acc-seq: never worse in 1/1") for line in lines)
    assert set(goals) >= {"never worse than accelerate (sequential and balanced) on every case"}


def test_main_prints_table_and_goals(bench, capsys):
    pytest.importorskip("accelerate")
    assert bench.main(["--filter", "llama-3.1-8b bf16 @ rtx3060+rtx4060", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("llama-3.1-8b bf16 @ rtx3060+rtx4060+cpu64GiB") >= 2
    assert "GOAL MET" in out or "GOAL NOT MET" in out
