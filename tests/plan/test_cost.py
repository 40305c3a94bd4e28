"""The CPU cost model: host RAM uses the host's measured figures (GEMV bandwidth, matmul FLOP/s, fixed
cost per block and per step) exactly as the formula says, kept per CPU and thread count, and the
predictions a run prints are the planner's own for the simulated cards and for their backing device.
No timing is asserted: the figures are given, and the formula is checked on exact numbers."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vramancer.devices.host_speed import (
    HostSpeed,
    default_host_speed,
    host_fingerprint,
    host_speed,
    host_speed_path,
    save_host_speed,
)
from vramancer.devices.inventory import host_device
from vramancer.devices.spec import parse_devices
from vramancer.models.resolve import profile as make_profile
from vramancer.plan.cost import CostModel
from vramancer.plan.explain import backing_prediction, run_predictions, run_workload
from vramancer.plan.plan import Workload
from vramancer.plan.planner import plan, plan_placement, plan_profile

SPEED = HostSpeed(bandwidth_bytes_per_s=10e9, gemm_flops_per_s=40e9, block_overhead_s=0.5e-3,
                  step_overhead_s=2e-3, request_overhead_s=7e-3, threads=2, fingerprint="test", source="measured")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def llama_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1024, "max_position_embeddings": 512, "torch_dtype": "float32",
        "tie_word_embeddings": False}))
    return folder


def test_cpu_block_time_is_the_formula_on_the_host_figures(llama_folder):
    prof = make_profile(str(llama_folder))
    cm = CostModel(prof, context=256, batch=1, prefill_chunk=64, host=SPEED)
    cpu = replace(host_device(), bandwidth_bytes_per_s=SPEED.bandwidth_bytes_per_s, tflops=SPEED.tflops)
    for b in prof.blocks:
        dec, pre = cm.execute_seconds(b, cpu)
        ctx = 128  # a decode step sees half the context on average
        # the KV cache: torch.cat's read and write of the DynamicCache, then attention's read
        want_dec = max((b.read_bytes_per_token + 3 * b.kv_bytes_per_token * ctx) / 10e9,
                       (b.flops_per_token + b.attn_flops_per_token_per_ctx * ctx) / 40e9) + 0.5e-3
        # the LM head of a generation computes the last position's logits only: one token of a chunk
        tokens = 1 if b.logits_bytes_per_token > 0 else 64
        want_pre = max(b.weights_bytes / 10e9,
                       tokens * (b.flops_per_token + b.attn_flops_per_token_per_ctx * 128) / 40e9) + 0.5e-3
        assert dec == pytest.approx(want_dec, rel=1e-12)
        assert pre == pytest.approx(want_pre, rel=1e-12)
    assert cm.step_seconds() == (2e-3, 7e-3)      # a prefill chunk is priced as a request's first forward
    assert CostModel(prof, 256, 1, 64, host=replace(SPEED, request_overhead_s=0.0)).step_seconds() == (2e-3, 2e-3)


def test_prefill_past_the_grain_size_pays_a_hand_off_per_parallel_op(llama_folder):
    from vramancer.plan.cost import PARALLEL_OPS_PER_LAYER, PARALLEL_OPS_PER_OTHER_BLOCK, TORCH_GRAIN_SIZE

    prof = make_profile(str(llama_folder))                    # hidden 256
    cpu = replace(host_device(), bandwidth_bytes_per_s=SPEED.bandwidth_bytes_per_s, tflops=SPEED.tflops)
    slow = replace(SPEED, parallel_op_s=1e-3)
    assert TORCH_GRAIN_SIZE == 128 * 256
    for chunk, extra_layer, extra_other in ((64, 0.0, 0.0),    # 64 x 256 elements: one thread, no hand-off
                                            (128, PARALLEL_OPS_PER_LAYER * 1e-3, PARALLEL_OPS_PER_OTHER_BLOCK * 1e-3)):
        base = CostModel(prof, 256, 1, chunk, host=SPEED)
        cm = CostModel(prof, 256, 1, chunk, host=slow)
        for b in prof.blocks:
            (d0, p0), (d1, p1) = base.execute_seconds(b, cpu), cm.execute_seconds(b, cpu)
            assert d1 == d0                                   # a decode step (1 x 256) stays on one thread
            if b.flops_per_token <= 0:
                want = 0.0                                    # an embedding lookup: no parallel op counted
            else:
                want = extra_layer if b.kv_bytes_per_token > 0 else extra_other
            assert p1 - p0 == pytest.approx(want, abs=1e-12)


def test_decode_pays_a_hand_off_per_matmul_and_attention_when_threaded(llama_folder):
    from vramancer.plan.cost import DECODE_PARALLEL_OPS_PER_LAYER, DECODE_PARALLEL_OPS_PER_OTHER_BLOCK

    prof = make_profile(str(llama_folder))
    cpu = replace(host_device(), bandwidth_bytes_per_s=SPEED.bandwidth_bytes_per_s, tflops=SPEED.tflops)
    assert (DECODE_PARALLEL_OPS_PER_LAYER, DECODE_PARALLEL_OPS_PER_OTHER_BLOCK) == (8, 1)   # 7 matmuls + attention
    base = CostModel(prof, 256, 1, 128, host=SPEED)
    cm = CostModel(prof, 256, 1, 128, host=replace(SPEED, decode_parallel_op_s=2e-4))
    kinds = []
    for b in prof.blocks:
        (d0, p0), (d1, p1) = base.execute_seconds(b, cpu), cm.execute_seconds(b, cpu)
        assert p1 == p0                                    # a 128-token chunk is priced by parallel_op_s
        if b.flops_per_token <= 0:
            kinds.append("embedding")
            assert d1 == d0
        elif b.kv_bytes_per_token > 0:
            kinds.append("layer")
            assert d1 - d0 == pytest.approx(8 * 2e-4, abs=1e-15)
        else:
            kinds.append("head")
            assert d1 - d0 == pytest.approx(2e-4, abs=1e-15)
    assert kinds == ["embedding"] + ["layer"] * 4 + ["head"]
    # one thread: no hand-off at all, in the defaults too
    assert default_host_speed(1).decode_parallel_op_s == default_host_speed(1).parallel_op_s == 0.0
    assert default_host_speed(2).decode_parallel_op_s > 0 and default_host_speed(2).parallel_op_s > 0


def test_head_prefill_is_one_token_of_the_lm_head_per_sequence(llama_folder):
    prof = make_profile(str(llama_folder))
    head, layer = prof.blocks[-1], prof.blocks[1]
    assert head.logits_bytes_per_token > 0 and head.flops_per_token > 0
    one, four = CostModel(prof, 256, 1, 128, host=SPEED), CostModel(prof, 256, 4, 128, host=SPEED)
    assert one._prefill_flops(head) == head.flops_per_token
    assert four._prefill_flops(head) == 4 * head.flops_per_token
    assert one._prefill_flops(layer) == 128 * (layer.flops_per_token + layer.attn_flops_per_token_per_ctx * 128)


def test_figures_kept_by_an_older_schema_are_not_used(cache):
    default = host_speed()
    entry = replace(SPEED, fingerprint=default.fingerprint).to_dict()
    host_speed_path().write_text(json.dumps({"schema": 1, "hosts": {default.fingerprint: {**entry, "schema": 1}}}))
    from vramancer.devices import host_speed as hs

    hs._read.cache_clear()
    assert host_speed() == default          # measured without the one-thread fixed costs: measure again


def test_overhead_line_fit():
    # the fixed costs are the line through the tiny decoders' step times (measured in the benchmark's smoke test)
    from vramancer.runtime.calibrate import _line

    assert _line([1.0, 4.0, 9.0], [3.0, 6.0, 11.0]) == pytest.approx((2.0, 1.0))
    assert _line([1.0, 4.0, 9.0], [0.5, 2.0, 4.5]) == pytest.approx((0.0, 0.5))


def test_plan_on_cpu_predicts_blocks_plus_step_with_kept_figures(cache, llama_folder):
    # kept for what host_speed() looks up: this CPU at the thread count the planner assumes
    speed = replace(SPEED, fingerprint=host_speed().fingerprint)
    assert speed.fingerprint == host_fingerprint(host_speed().threads)
    save_host_speed(speed)
    assert host_speed_path().parent == cache
    got = host_speed()
    assert got.source == "measured" and got.bandwidth_bytes_per_s == 10e9 and got.block_overhead_s == 0.5e-3
    cpu = parse_devices("cpu")[0]
    assert cpu.bandwidth_bytes_per_s == 10e9 and cpu.tflops == pytest.approx(0.04)
    prof = make_profile(str(llama_folder))
    p = plan_profile(prof, [cpu], Workload(context=256, prefill_chunk=64, dtype=prof.dtype), suggest=False)
    cm = CostModel(prof, 256, 1, 64, host=speed)
    blocks = [cm.execute_seconds(b, cpu) for b in prof.blocks]
    want_dec = sum(d for d, _ in blocks) + 2e-3
    want_pre = sum(x for _, x in blocks) + 7e-3
    assert p.predicted.decode_ms_per_step == pytest.approx(want_dec * 1e3, abs=1e-3)
    assert p.predicted.decode_tokens_per_s == pytest.approx(1 / want_dec, rel=1e-3)
    assert p.predicted.prefill_tokens_per_s == pytest.approx(64 / want_pre, rel=1e-3)


def test_kept_figures_are_per_fingerprint_and_bad_files_fall_back(cache):
    default = host_speed()
    assert default.source == "default"
    save_host_speed(replace(SPEED, fingerprint="another machine"))
    assert host_speed() == default                     # not this CPU: not used
    host_speed_path().write_text("{not json")
    from vramancer.devices import host_speed as hs

    hs._read.cache_clear()
    assert host_speed() == default
    save_host_speed(replace(SPEED, fingerprint=default.fingerprint))   # a broken file is replaced
    assert host_speed().bandwidth_bytes_per_s == 10e9


def test_default_figures_scale_with_threads_up_to_dram():
    one, two, many = default_host_speed(1), default_host_speed(2), default_host_speed(64)
    assert two.bandwidth_bytes_per_s == 2 * one.bandwidth_bytes_per_s
    assert two.gemm_flops_per_s == 2 * one.gemm_flops_per_s
    assert many.bandwidth_bytes_per_s == 40e9          # a desktop's DRAM, not 64 x a core's share
    assert one.block_overhead_s == many.block_overhead_s > 0 and one.step_overhead_s > 0


def test_simulated_cards_are_also_predicted_on_their_backing_device(cache, llama_folder):
    prof = make_profile(str(llama_folder))
    p = plan(str(llama_folder), devices="rtx3090,rtx3060", split=[1, 1])
    b = backing_prediction(p, prof)
    assert b is not None and b.device == "cpu" and set(b.simulated) == {"rtx3090#0", "rtx3060-12gb#0"}
    host = replace(host_device(), free_bytes=1 << 60, total_bytes=1 << 60)
    want = plan_placement(prof, [host], p.workload, ["cpu"] * len(p.blocks), offload_mode="execute").predicted
    assert b.predicted == want
    assert b.predicted.decode_tokens_per_s < p.predicted.decode_tokens_per_s   # a CPU is no RTX 3090
    # after a run: the workload it measured (22-token prompt, 16 new tokens)
    r = run_predictions(p, prof, prompt_tokens=22, new_tokens=16)
    w = run_workload(p, 22, 16)
    assert (w.context, w.prefill_chunk) == (38, 22)
    assert r.backing.predicted == plan_placement(prof, [host], w, ["cpu"] * len(p.blocks),
                                                 offload_mode="execute").predicted
    assert r.named == plan_placement(prof, p.devices, w, [blk.device for blk in p.blocks]).predicted
    # real devices: nothing simulated, no backing line
    assert backing_prediction(plan(str(llama_folder), devices="cpu"), prof) is None


def test_run_prints_measured_next_to_predicted_on_the_device_that_ran(cache, llama_folder):
    import io

    from rich.console import Console

    from vramancer.plan.commands import _tps
    from vramancer.runtime.commands.run import predictions_json, render_measured_vs_predicted
    from vramancer.runtime.generate import GenerationResult

    prof = make_profile(str(llama_folder))
    p = plan(str(llama_folder), devices="rtx3090,rtx3060", split=[1, 1])
    r = run_predictions(p, prof, prompt_tokens=20, new_tokens=11)
    result = GenerationResult(text="", prompt_tokens=20, new_tokens=11, prefill_seconds=0.5, decode_seconds=2.0)
    buf = io.StringIO()
    render_measured_vs_predicted(Console(file=buf, width=300, color_system=None), result, r)
    line = buf.getvalue().strip()
    cpu = r.backing.predicted
    assert line.startswith(f"decode 5.0 measured / {_tps(cpu.decode_tokens_per_s)} predicted on cpu, "
                           f"{5.0 / cpu.decode_tokens_per_s:.2f}x · prefill 40.0 measured / "
                           f"{_tps(cpu.prefill_tokens_per_s)} predicted on cpu")
    assert f"on the cards named the plan predicts {_tps(r.named.decode_tokens_per_s)} decode" in line
    d = predictions_json(r)
    assert d["backing"]["device"] == "cpu" and d["backing"]["decode_tokens_per_s"] == cpu.decode_tokens_per_s
    assert d["named"] == r.named.to_dict()
