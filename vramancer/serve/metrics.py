"""Prometheus metrics of the server, in their own CollectorRegistry (never the global one,
so two servers in one process, as in tests, do not collide).

A pull collector: the engine never pushes into Prometheus objects. When /metrics is scraped,
``EngineCollector`` reads the engine's last published ``EngineStats`` (queue, batch, KV bytes per
stage), its stages' KV budgets and its ``EngineCounters`` (tokens, latency histograms). Only the
HTTP request counter is kept here, counted by the app's middleware.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client.metrics_core import Metric

    from .counters import HistogramSnapshot
    from .engine import Engine

__all__ = ["ServeMetrics", "EngineCollector", "ENDPOINTS"]

# Label values for the requests counter; any other path counts as "other", so random paths
# cannot blow up the number of series.
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def _histogram(name: str, doc: str, h: HistogramSnapshot):
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    return HistogramMetricFamily(name, doc, buckets=[(floatToGoString(b), n) for b, n in h.cumulative()],
                                 sum_value=h.sum_s)


class EngineCollector:
    """Reads ``engine`` at each scrape (a prometheus_client custom collector)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats()
        counters = self.engine.counters.snapshot()
        stages = self.engine.stages
        yield CounterMetricFamily("vramancer_serve_prompt_tokens", "prompt tokens processed",
                                  value=counters.prompt_tokens)
        yield CounterMetricFamily("vramancer_serve_completion_tokens", "tokens generated",
                                  value=counters.completion_tokens)
        yield _histogram("vramancer_serve_time_to_first_token_seconds",
                         "time from request arrival to its first token", counters.time_to_first_token)
        yield _histogram("vramancer_serve_inter_token_latency_seconds",
                         "time between consecutive tokens of a request", counters.inter_token_latency)
        yield GaugeMetricFamily("vramancer_serve_queue_depth", "requests waiting for admission", value=stats.queued)
        yield GaugeMetricFamily("vramancer_serve_prefilling_requests", "requests being prefilled",
                                value=stats.prefilling)
        yield GaugeMetricFamily("vramancer_serve_running_batch_size", "rows in the running decode batch",
                                value=stats.running)
        per_stage = [
            ("vramancer_serve_kv_cache_bytes", "bytes of KV cache tensors in use", stats.kv_bytes_by_stage),
            ("vramancer_serve_kv_cache_reserved_bytes",
             "KV bytes admitted requests may grow to (padded batch x longest prompt + max_tokens)",
             stats.reserved_bytes_by_stage),
            ("vramancer_serve_kv_cache_budget_bytes", "KV bytes the plan reserved per stage",
             tuple(st.budget_bytes for st in stages)),
        ]
        for name, doc, values in per_stage:
            g = GaugeMetricFamily(name, doc, labels=["stage", "device"])
            for st, value in zip(stages, values):
                g.add_metric([str(st.index), st.device], value)
            yield g


class ServeMetrics:
    """The registry /metrics renders: the engine's figures (pulled), HTTP requests by endpoint
    and status, and optionally a telemetry Recorder's device gauges."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry()
        self.requests = Counter("vramancer_serve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def add_telemetry(self, recorder: Any) -> None:
        """Also export a telemetry Recorder's device gauges (VRAM used, utilization, ...)."""
        from ..telemetry.prometheus import RecorderCollector

        self.registry.register(RecorderCollector(recorder))

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
