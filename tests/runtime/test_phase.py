"""Offloaded layers run where each phase is fastest (plan/phase.py, runtime/stream.py PhaseHook): a
host-RAM stage in mode "phase" streams its weights to its GPU for a prefill forward (>= 32 tokens)
and runs on the host for decode steps. Greedy ids equal the unsplit model's; every unit took the path
its forward's token count says; measured bytes equal the plan's. The planner picks the mode by the
representative request's time (tests/plan side: the issue's llama-3.1-70b example)."""
from __future__ import annotations

import pytest

from .conftest import build_model, placed_plan

torch = pytest.importorskip("torch")

NEW_TOKENS = 8


def _phase_plan(folder, backing: str = "cpu"):
    """The planner's streamed placement (GPU, host RAM streamed to a GPU, GPU) with its host stage run
    per phase. (On a model this small the host's per-layer overheads make the planner stream it for
    decode too; tests/plan/test_phase.py has the planner choosing "phase".)"""
    streamed = placed_plan(folder, "rtx3090,cpu:8GiB,rtx4090", "stream", backing=backing)
    assert [s.mode for s in streamed.stages] == ["execute", "stream", "execute"]
    streamed.stages[1].mode = "phase"
    streamed.validate()
    return streamed


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phase") / "llama"
    build_model("llama").save_pretrained(folder, safe_serialization=True)
    return folder


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("prompt", [40, 6])
def test_phase_stage_greedy_equals_unsplit(llama_folder, prompt):
    from transformers import AutoModelForCausalLM

    from vramancer.plan.plan import PHASE_PREFILL_TOKENS, Plan
    from vramancer.runtime.loader import load

    plan = Plan.from_json(_phase_plan(llama_folder).to_json())
    ids = torch.randint(3, 96, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    ref = _greedy(AutoModelForCausalLM.from_pretrained(llama_folder).eval(), ids)
    model = load(llama_folder, plan=plan)
    rt = model.vramancer
    assert [s.mode for s in rt.stages] == ["execute", "phase", "execute"]
    assert "~" in repr(rt)
    from vramancer.runtime.telemetry_feed import StageFeed

    feed = StageFeed(plan).attach(rt)   # the live view, watching the generation
    assert torch.equal(_greedy(model, ids), ref)
    units = len(rt.stages[1].stream_units)
    assert units == plan.stages[1].num_blocks
    stats = rt.phase_stats
    prefill_on_gpu = prompt >= PHASE_PREFILL_TOKENS
    assert stats.gpu_forwards == (units if prefill_on_gpu else 0)
    assert stats.host_forwards == units * (NEW_TOKENS - 1 + (0 if prefill_on_gpu else 1))
    rep = rt.memory_report()
    for st, row in zip(plan.stages, rep.stages, strict=True):
        assert row.weights_bytes == st.weights_bytes and row.misplaced == []
    (buf,) = rep.stream_buffers
    assert buf.buffer_bytes <= buf.planned_buffer_bytes and buf.stages == (1,)
    # the live view: the host holds the phase stage's weights and the KV cache of a forward held here
    with torch.no_grad():
        out = model(ids, use_cache=True)
    host = {s.device: s.used_bytes for s in feed.device_samples()}["cpu"]
    held = feed.stage_bytes()
    assert held.stages[1].kv_cache_bytes > 0 and held.stages[1].kv_devices == ("cpu",)
    assert host == held.stages[1].weights_bytes + held.stages[1].kv_cache_bytes
    del out
    feed.detach()
    rt.detach()


def test_forward_tokens():
    from vramancer.runtime.stream import forward_tokens

    h = torch.zeros(2, 17, 8)
    assert forward_tokens((h,), {}) == 34
    assert forward_tokens((), {"hidden_states": h[:, :1]}) == 2
    assert forward_tokens((), {}) == 0


def test_phase_mode_only_on_host_stages(llama_folder):
    from vramancer.errors import BadInputError
    from vramancer.plan.plan import Plan

    d = _phase_plan(llama_folder).to_dict()
    d["stages"][0]["mode"] = "phase"
    with pytest.raises(BadInputError, match="only a host RAM"):
        Plan.from_dict(d)


@pytest.mark.gpu
def test_phase_stage_on_cuda(llama_folder):
    """On a real GPU: prefill runs on it with the weights streamed, decode on the CPU with the KV cache
    there; the KV moved to the GPU for the prefill and back."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from transformers import AutoModelForCausalLM

    from vramancer.runtime.loader import load

    plan = _phase_plan(llama_folder, backing="cuda:0")
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = _greedy(AutoModelForCausalLM.from_pretrained(llama_folder).eval(), ids)
    model = load(llama_folder, plan=plan)
    out = _greedy(model, ids)
    assert torch.equal(out.cpu(), ref)
    rt = model.vramancer
    assert rt.phase_stats.gpu_forwards == plan.stages[1].num_blocks and rt.phase_stats.kv_moved_bytes > 0
    rep = rt.memory_report()
    assert rep.stages[1].kv_devices == ["cpu"]
