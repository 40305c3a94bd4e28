"""The engine over a model split by the runtime: per-stage KV budgets from the plan, and
micro-batches overlapping across stages (pipeline lanes) with the same greedy output."""
from __future__ import annotations

import pytest

from vramancer.serve.engine import Engine
from vramancer.serve.sampling import SamplingParams

from .test_engine import GREEDY, PROMPTS, encode, run_all


@pytest.fixture(scope="module")
def alone_texts(tiny):
    model, tok = tiny
    eng = Engine(model, tok, context_tokens=256)
    eng.start()
    try:
        return [eng.generate(encode(tok, p), GREEDY).text for p in PROMPTS]
    finally:
        eng.stop()


def test_stages_and_budgets_come_from_the_plan(tiny, split_tiny):
    _, tok = tiny
    eng = Engine(split_tiny, tok, context_tokens=256)
    plan = split_tiny.vramancer.plan
    assert [s.layers for s in eng.stages] == [(0, 2), (2, 4)]
    assert [s.device for s in eng.stages] == [s.device for s in plan.stages]
    assert [s.budget_bytes for s in eng.stages] == [s.kv_cache_bytes for s in plan.stages]
    # measured bytes per token agree with the planner's profile, block by block
    per_block = [b.kv_bytes_per_token for b in plan.blocks]
    assert eng.layer_kv_bytes_per_token == per_block[1:-1]
    assert [s.kv_bytes_per_token for s in eng.stages] == [sum(per_block[1:3]), sum(per_block[3:5])]


@pytest.mark.parametrize("lanes", [1, 2])
def test_split_model_batched_matches_unsplit_alone(tiny, split_tiny, alone_texts, lanes):
    _, tok = tiny
    eng = Engine(split_tiny, tok, context_tokens=256, pipeline_lanes=lanes, min_rows_per_lane=2)
    try:
        _, waiters = run_all(eng, [encode(tok, p) for p in PROMPTS], GREEDY)
        stats = eng.wait_idle()
    finally:
        eng.stop()
    assert [w.text for w in waiters] == alone_texts
    assert stats.peak_lanes == lanes and stats.peak_running == len(PROMPTS)
    budgets = [s.budget_bytes for s in eng.stages]
    assert all(0 < peak <= b for peak, b in zip(stats.peak_kv_bytes_by_stage, budgets))
    assert stats.kv_bytes_by_stage == (0, 0)


def test_plan_budget_queues_what_the_stages_cannot_hold(tiny, split_tiny):
    """The plan holds 4 x 256 tokens per stage: 8 requests reserving 200 tokens each run at most
    5 at once (5 x 200 <= 1024 < 6 x 200)."""
    _, tok = tiny
    eng = Engine(split_tiny, tok, context_tokens=256, pipeline_lanes=2, min_rows_per_lane=2)
    prompts = [[5 + i] * 10 for i in range(8)]
    try:
        _, waiters = run_all(eng, prompts, SamplingParams(max_tokens=190, temperature=0.0, ignore_eos=True))
        stats = eng.wait_idle()
    finally:
        eng.stop()
    assert all(w.events[-1].completion_tokens == 190 for w in waiters)
    assert stats.peak_running == 5 and stats.waited == 3
    per_token = [s.kv_bytes_per_token for s in eng.stages]
    assert all(peak <= 5 * 200 * t for peak, t in zip(stats.peak_kv_bytes_by_stage, per_token))
