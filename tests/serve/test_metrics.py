"""/metrics as a pull collector: what a scrape shows is read from the engine at that moment,
and adds up to the requests the engine finished."""
from __future__ import annotations

import pytest

from vramancer.serve.counters import LATENCY_BUCKETS_S, LatencyHistogram
from vramancer.serve.engine import Engine
from vramancer.serve.sampling import SamplingParams

from .test_engine import encode, run_all

prometheus_client = pytest.importorskip("prometheus_client")


def scrape(metrics) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_histogram_buckets_are_prometheus_le_buckets():
    h = LatencyHistogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap.counts == (2, 2, 1) and snap.count == 5 and snap.sum_s == pytest.approx(4.65)
    assert snap.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]


def test_a_scrape_reads_the_engine(tiny):
    from vramancer.serve.metrics import ServeMetrics

    model, tok = tiny
    engine = Engine(model, tok, context_tokens=128, max_batch=4, prefill_chunk_tokens=8, kv_budget_bytes=None)
    metrics = ServeMetrics(engine)
    try:
        before = scrape(metrics)
        assert before[("vramancer_serve_completion_tokens_total", ())] == 0
        assert before[("vramancer_serve_kv_cache_budget_bytes", (("device", "cpu"), ("stage", "0")))] == \
            engine.stages[0].budget_bytes == 128 * 4 * engine.kv_bytes_per_token
        prompts = [encode(tok, p) for p in ("Hello there", "VRAM is memory", "A")]
        params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
        run_all(engine, prompts, params)
        engine.wait_idle(60)
        after = scrape(metrics)
    finally:
        engine.stop()
    assert after[("vramancer_serve_prompt_tokens_total", ())] == sum(map(len, prompts))
    assert after[("vramancer_serve_completion_tokens_total", ())] == 3 * 7
    # one first token per request, the other six tokens of each are inter-token gaps
    assert after[("vramancer_serve_time_to_first_token_seconds_count", ())] == 3
    assert after[("vramancer_serve_inter_token_latency_seconds_count", ())] == 3 * 6
    inf = (("le", "+Inf"),)
    assert after[("vramancer_serve_inter_token_latency_seconds_bucket", inf)] == 3 * 6
    les = [after[("vramancer_serve_time_to_first_token_seconds_bucket", (("le", str(b)),))]
           for b in LATENCY_BUCKETS_S]
    assert les == sorted(les)
    stage = (("device", "cpu"), ("stage", "0"))
    assert after[("vramancer_serve_kv_cache_bytes", stage)] == 0          # all finished: cache freed
    assert after[("vramancer_serve_kv_cache_reserved_bytes", stage)] == 0
    assert after[("vramancer_serve_queue_depth", ())] == 0
    assert after[("vramancer_serve_running_batch_size", ())] == 0
