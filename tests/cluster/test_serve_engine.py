"""serve --cluster's engine (serve/cluster.py ClusterEngine) without Ray: the stage workers' own
StageModel chained in this process stands in for the cluster pipeline (same ``forward(ids, start)``).
Requests run one at a time in arrival order and give what the single-process server gives for the
same split; a queued request cancelled never runs; bad requests are refused; /metrics reads it.
(Over a real cluster, inside a network namespace: test_cli.py.)"""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.runtime.conftest import make_plan  # noqa: E402


class InProcessStages:
    """``plan``'s stages as StageModels in this process, chained: what ClusterPipeline.forward does
    over the Link. Records every forward (start, tokens); waits on ``gate`` before the first one."""

    def __init__(self, folder, plan) -> None:
        from vramancer.cluster.stage import StageModel

        self.plan = plan
        self.stages = [StageModel.from_folder(folder, plan, i) for i in range(len(plan.stages))]
        self.calls: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, ids: list[int], start: int):
        assert self.gate.wait(60), "the test never opened the gate"
        self.calls.append((start, len(ids)))
        h = torch.tensor([ids], dtype=torch.int64)
        for st in self.stages:
            h = st.forward(h, start)
        return h


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """(folder, plan, tokenizer): the tiny chat model split over 2 stages."""
    from transformers import AutoTokenizer

    from vramancer.serve.testing import build_tiny_chat_model

    folder = build_tiny_chat_model(tmp_path_factory.mktemp("cluster-serve") / "chat")
    return folder, make_plan(folder, 2), AutoTokenizer.from_pretrained(folder)


def _engine(split):
    from vramancer.serve.cluster import ClusterEngine

    folder, plan, tok = split
    pipe = InProcessStages(folder, plan)
    eng = ClusterEngine(pipe, tok, vocab_size=len(tok), eos_ids=frozenset({tok.eos_token_id}))
    return eng, pipe


def test_one_at_a_time_in_order_equal_to_the_single_process_server(split):
    from vramancer.runtime.loader import load
    from vramancer.serve.engine import Engine
    from vramancer.serve.sampling import SamplingParams

    folder, plan, tok = split
    prompts = [tok("Hello! How are you")["input_ids"], tok("The quick brown fox")["input_ids"],
               tok("VRAM is the memory")["input_ids"]]
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=4, temperature=0.0)]
    model = load(str(folder), plan=plan)
    try:
        ref = Engine(model, tok, context_tokens=plan.workload.context, plan=plan, pipeline_lanes=1)
        ref.start()
        try:
            want = [ref.generate(p, sp) for p, sp in zip(prompts, params)]
        finally:
            ref.stop()
    finally:
        model.vramancer.free()

    eng, pipe = _engine(split)
    pipe.gate.clear()          # the first request holds its first forward until all three are queued
    eng.start()
    try:
        results: list = [None] * 3
        threads = []
        for i in range(3):
            t = threading.Thread(target=lambda i=i: results.__setitem__(i, eng.generate(prompts[i], params[i])))
            t.start()
            threads.append(t)
            while eng.stats().queued + eng.stats().prefilling < i + 1:   # submitted in this order
                threading.Event().wait(0.005)
        pipe.gate.set()
        for t in threads:
            t.join(60)
    finally:
        eng.stop()
    for got, ref_ev in zip(results, want):
        assert (got.text, got.finish_reason, got.completion_tokens) == \
               (ref_ev.text, ref_ev.finish_reason, ref_ev.completion_tokens)
    assert [r.completion_tokens for r in results[:2]] == [6, 9]
    # each request is one new sequence (start 0), prefilled then one token per forward, none interleaved
    starts = [i for i, (s, _) in enumerate(pipe.calls) if s == 0]
    assert len(starts) == 3
    for (a, b), p, r in zip(zip(starts, starts[1:] + [len(pipe.calls)]), prompts, results):
        calls = pipe.calls[a:b]
        assert sum(n for _, n in calls) == len(p) + r.completion_tokens - 1
        assert [s for s, _ in calls] == sorted(s for s, _ in calls)
    st = eng.stats()
    assert (st.waited, st.finished, st.peak_running, st.queued, st.running) == (2, 3, 1, 0, 0)
    assert eng.counters.snapshot().completion_tokens == sum(r.completion_tokens for r in results)


def test_cancelled_while_queued_never_runs_and_bad_requests_are_refused(split):
    from vramancer.serve.engine import RequestRejected
    from vramancer.serve.metrics import ServeMetrics
    from vramancer.serve.sampling import SamplingParams

    eng, pipe = _engine(split)
    ctx = eng.context_tokens
    with pytest.raises(RequestRejected, match="exceeds the planned context") as e:
        eng.submit([5] * (ctx - 3), SamplingParams(max_tokens=4), lambda ev: None)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        eng.submit([5, eng.vocab_size], SamplingParams(max_tokens=2), lambda ev: None)

    pipe.gate.clear()
    eng.start()
    try:
        events: list = []
        first = eng.submit([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0), lambda ev: None)
        queued = eng.submit([8, 9], SamplingParams(max_tokens=3, temperature=0.0), events.append)
        eng.cancel(queued)
        for _ in range(2000):                           # the first request is taken (held at the gate)
            if eng.stats().prefilling == 1:
                break
            threading.Event().wait(0.005)
        assert [(ev.kind, ev.finish_reason, ev.completion_tokens) for ev in events] == [("finish", "cancelled", 0)]
        body = ServeMetrics(eng).render()[0].decode()   # while the first request is in its prefill
        pipe.gate.set()
        for _ in range(2000):
            if first.state == "done":
                break
            threading.Event().wait(0.005)
    finally:
        eng.stop()
    assert first.state == "done" and len(first.output_ids) == 3
    assert all(s == 0 or s >= 3 for s, _ in pipe.calls) and sum(n for _, n in pipe.calls) == 3 + 2   # [8, 9] never ran
    for st in eng.stages:
        assert f'vramancer_serve_kv_cache_budget_bytes{{device="{st.device}",stage="{st.index}"}} ' \
               f'{float(st.budget_bytes)}' in body
    assert "vramancer_serve_prefilling_requests 1.0" in body
